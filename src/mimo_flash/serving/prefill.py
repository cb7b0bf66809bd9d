"""The scheduler's prompt forwards (serving/scheduler.py, step 3): which slots' chunks share a forward, the aligned
block of cache rows each forward runs over, and the runners of those blocks, eager or with graph_prefill CUDA graphs
of padded chunks, all made by warmup().

A forward runs over a block of rows [a, b) of the cache (KVCache.rows), a a multiple of a power of two n and
b = min(a + n, max_slots): at most 2 * max_slots - 1 blocks exist. Rows of the block outside the group are masked
(their cache untouched). graph_prefill: a chunk of T tokens is left-padded with masked tokens to a power of two
>= 16 (at most the prefill chunk), blocks have at least GRAPH_PREFILL_ROWS rows, groups merge only while a block's
padded tokens fit prefill_tokens, and the logits of the last column are always kept: the few shapes warmup() makes.
An eager forward costs tens of ms of host time on a GPU whatever its size; a replay costs microseconds.
"""

from __future__ import annotations

import torch

from ..generation.runner import GraphRunner, Runner, graph_bucket
from ..options import options, override

GRAPH_PREFILL_ROWS = 16  # graph_prefill: the smallest row block a prefill forward runs over (fewer blocks, fewer graphs)


class PrefillForwards:
    """model and cache: the scheduler's; chunk: its prefill_chunk; prefill_tokens: prompt tokens a step prefills;
    graphed: replay CUDA graphs (graph-shaped code on a CPU). `runners` maps each block (a, b) to its runner;
    `count` is the number of forwards run."""

    def __init__(self, model, cache, chunk: int, prefill_tokens: int, graphed: bool) -> None:
        self.model, self.cache, self.B, self.chunk = model, cache, cache.B, chunk
        self.prefill_tokens, self.graphed = prefill_tokens, graphed
        self.cuda = cache.device.type == "cuda"
        self.runners: dict[tuple[int, int], Runner] = {}
        self.pool = torch.cuda.graph_pool_handle() if graphed and self.cuda else None  # (one pool for all graphs)
        self.count = 0

    def split(self, T: int, group: list) -> list[list]:
        """(slot, c0, c1) chunks of one length T, in slot order -> the groups that share a forward. A block's rows
        outside the group compute for nothing: a group is split where more than half its block would idle, except
        on CUDA while the block holds at most prefill_tokens tokens (there a forward's host time costs more than the
        idle rows' arithmetic). graphed: groups merge only while the block's padded tokens fit prefill_tokens."""
        parts: list[list] = []
        W = self.padded(T) if self.graphed else T  # (the forward's width)
        for g in group:
            if parts:
                cand = parts[-1] + [g]
                a, b = self.block(cand[0][0].i, g[0].i + 1)
                cheap = (self.cuda or self.graphed) and (b - a) * W <= self.prefill_tokens
                if cheap or (b - a <= 2 * len(cand) and not self.graphed):
                    parts[-1] = cand
                    continue
            parts.append([g])
        return parts

    def block(self, lo: int, hi: int) -> tuple[int, int]:
        """The aligned block of rows [a, b) covering rows [lo, hi)."""
        n = GRAPH_PREFILL_ROWS if self.graphed else 1
        while lo // n != (hi - 1) // n:
            n *= 2
        a = lo // n * n
        return a, min(a + n, self.B)

    def span(self, lo: int, hi: int) -> tuple[int, Runner]:
        """The runner over block(lo, hi), made on first use (graphed: a GraphRunner whose main() graphs chunks of
        up to the prefill chunk). Returns (its first row, runner)."""
        a, b = self.block(lo, hi)
        r = self.runners.get((a, b))
        if r is None:
            view = self.cache.rows(a, b)
            r = GraphRunner(self.model, view, self.cache.S, max_graph_tokens=self.chunk, pool=self.pool) \
                if self.graphed else Runner(self.model, view, self.cache.S)
            self.runners[(a, b)] = r
        return a, r

    def padded(self, T: int) -> int:
        """The width a graphed chunk of T tokens is padded to."""
        n = 16
        while n < T:
            n *= 2
        return max(T, min(n, self.chunk))

    def forward(self, chunks: list[tuple[int, list[int], int]], all_logits: bool, finishing: bool):
        """One forward for chunks (cache row, tokens, first position) of one length T -> (first row of the block,
        logits [R, 1 or T, V] or None, hidden states [R, T, D] of the chunks' own columns). all_logits: every
        position's logits (prompt logprobs: eager); finishing: some chunk ends its prompt (its last logits)."""
        T = len(chunks[0][1])
        rows = [r for r, _, _ in chunks]
        a, runner = self.span(min(rows), max(rows) + 1)
        R = runner.cache.B
        graphed = self.graphed and not all_logits
        W = self.padded(T) if graphed else T  # (graphed: left-padded with masked tokens to W)
        ids, pos = [[0] * W for _ in range(R)], [[0] * W for _ in range(R)]
        valid = [[False] * W for _ in range(R)]
        for r, tokens, c0 in chunks:
            ids[r - a] = [0] * (W - T) + tokens
            pos[r - a] = [c0] * (W - T) + list(range(c0, c0 + T))
            valid[r - a] = [False] * (W - T) + [True] * T
        dev = self.cache.device
        v = None if len(chunks) == R and not graphed else torch.tensor(valid, device=dev)
        # (graphed: always the last column's logits, a few rows of lm_head, so that one graph serves both)
        mode = "all" if all_logits else ("last" if finishing or graphed else "none")
        self.count += 1
        logits, h = self._run(runner, torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), v,
                              max(c0 + T for _, _, c0 in chunks), mode, graphed)
        return a, logits, h[:, W - T:]

    @staticmethod
    def _run(runner, ids, pos, valid, kv_len: int, logits: str, graphed: bool):
        """runner.main for a prefill chunk; graphed: a graph-shaped call whose experts run the decode backend over
        the sorted pairs (never every expert on every token, whose intermediate would hold E x tokens rows)."""
        if not graphed:
            return runner.main(ids, pos, valid, kv_len, logits=logits)
        mode = options().decode_experts
        # (dense and fused run every expert on every token; routed is not timed at prefill chunks' sizes)
        experts = "grouped_mm" if mode in ("dense", "fused", "routed") else mode
        with override(decode_experts=experts):
            return runner.main(ids, pos, valid, kv_len, logits=logits, graph=True)

    def warmup(self, lengths: list[int]) -> None:
        """graphed: every forward split() can ask for, every row masked (which writes nothing), at each cache
        length bucket of `lengths`."""
        if not self.graphed:
            return
        widths = sorted({self.padded(t) for t in range(1, self.chunk + 1)})
        blocks, n = set(), GRAPH_PREFILL_ROWS
        while True:
            blocks |= {(a, min(a + n, self.B)) for a in range(0, self.B, n)}
            if n >= self.B:
                break
            n *= 2
        for a, b in sorted(blocks):
            runner, R = self.span(a, b)[1], b - a
            for W in (w for w in widths if R * w <= max(self.prefill_tokens, GRAPH_PREFILL_ROWS * w)):  # (split)
                ids = torch.zeros(R, W, dtype=torch.long, device=self.cache.device)
                valid = torch.zeros(R, W, dtype=torch.bool, device=self.cache.device)
                for kv in sorted({graph_bucket(x, self.cache.S, R) for x in lengths}):
                    self._run(runner, ids, ids, valid, kv, "last", True)
