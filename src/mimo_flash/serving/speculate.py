"""MTP speculative decoding for the serving scheduler's slots (Scheduler(speculative_k=K or "auto")).

The algorithm is generation/speculative.py's; this module keeps its state for a scheduler whose rows come
and go. One SpecState covers every row of the scheduler's KVCache; row i is live while slot i speculates.
  - Every slot speculates. Greedy rows accept by argmax; sampled ones by the rejection rule, each with its own
    parameters and generator; rows with a repetition penalty with their own seen tokens, each verified column's
    target penalised by the tokens before it (speculative.RowSampling: a row's samples do not depend on its
    neighbours; a step with such rows runs eagerly, a plain-greedy-only one as one graph on CUDA). Logprobs
    come from the verification logits (`logits`), as a plain step's come from its logits.
  - Rings (rings.SpecRings) hold every speculating row's last `tail` + 2K + 2 committed tokens and main
    hidden states: the prompt's tail as it is prefilled (`record_prompt`), then every verified or plain step.
  - `join` (the prompt prefilled, its first token x_N sampled) only sets the row's N and x_N: its MTP layers
    are not current yet. Each row counts its current MTP layers (`fresh`); a step with k drafts first catches
    up the rows with fewer in batched passes over blocks of nearby rows (`_catch_up`: speculative.spec_reprime,
    spec_enter over the rings' last k windows of positions, the block's other rows masked), then drafts k tokens
    for every speculating row, verifies k + 1 in one main forward over rows [0, n) and accepts per row (`step`);
    every other row of [0, n) is frozen: masked out of the forwards, its cache and state untouched. It returns
    each row's new tokens.
  - Adaptive K ("auto"): each step's k = 0 .. K is chosen by an AdaptiveK (generation/adaptive.py) from the
    running acceptance and the measured seconds of the decode part of a step with each k (one controller per
    decode batch bucket: costs depend on the batch; the acceptance rates they share). At k = 0 the speculating
    slots decode through the scheduler's plain step with the others, and `plain` records that step in the
    rings; their MTP layers fall behind until a step with drafts catches them up.
A slot that finishes just stops being passed to `step`; the next request in its slot joins afresh (its
cache row, MTP rings included, is reset at admission).

The prefix cache stores the main model's layers only: a speculating slot restores at most `P - tail`
prompt positions from it (Scheduler._admit), so the tail is always prefilled and its hidden states exist.
"""

from __future__ import annotations

import time

import torch

from ..generation.acceptance import RowSampling
from ..generation.adaptive import AdaptiveK
from ..generation.rings import SpecRings
from ..generation.sampling import GREEDY
from ..generation.speculative import SpecState, spec_reprime, spec_step


def _per_row(st: SpecState) -> list[torch.Tensor]:
    """A SpecState's per-row tensors (each [B, ...]) that a step carries to the next one (a step drafts afresh:
    drafts and their probabilities are not carried)."""
    return [st.N, st.N_prev, st.tok, st.recent, st.h_main]


class SpecSlots:
    """Speculative state of `B` cache rows for K drafts per step (adaptive: 0 .. K, chosen per step). tail:
    the prompt positions whose hidden states prime a row's MTP layers (K * sliding_window, see spec_enter)."""

    def __init__(self, model, K: int, B: int, adaptive: bool = False) -> None:
        config = model.config
        if not isinstance(K, int) or isinstance(K, bool) or not 0 < K <= config.num_nextn_predict_layers:
            raise ValueError(f"speculative_k={K!r}: speculation drafts with the MTP layers, of which the model has "
                             f"{config.num_nextn_predict_layers}; use 0 (off) .. {config.num_nextn_predict_layers}")
        self.K, self.adaptive = K, adaptive
        self.window = config.sliding_window
        self.tail = K * self.window
        dev, D = model.device, config.hidden_size
        z = torch.zeros(B, dtype=torch.long, device=dev)
        h = torch.zeros(B, D, dtype=model.dtype, device=dev)
        # (a step writes its k + 1 verified positions, committed or not: 2K + 2 slots more than a catch-up reads)
        self.rings = SpecRings(B, self.tail + 2 * K + 2, D, dev, model.dtype)
        self.st = SpecState(K=K, N=z, N_prev=z.clone(), tok=z.clone(),
                            recent=torch.zeros(B, K + 1, dtype=torch.long, device=dev),
                            h_main=torch.zeros(B, K + 1, D, dtype=model.dtype, device=dev),
                            stash=[h.clone() for _ in range(K - 1)],
                            drafts=torch.zeros(B, K, dtype=torch.long, device=dev), q=None, seen=None, n_max=0,
                            rings=self.rings)
        self.fresh = [0] * B  # per row: the MTP layers whose caches are current
        self.ctls: dict[int, AdaptiveK] = {}  # decode batch bucket -> its controller (adaptive)
        self.steps_k: list[int] = []  # the k of every step that carried speculating rows
        self._timing: tuple[int, int] | None = None  # (bucket, k) of this step's speculating rows, until timed
        self.catch_up_seconds = 0.0  # spent catching rows up
        self.logits: torch.Tensor | None = None  # [n, k + 1, V] the last step's verification logits

    # ------------------------------------------------------------------ what the rings record
    def record_prompt(self, i: int, prompt: list[int], c0: int, h: torch.Tensor) -> None:
        """Slot i's prefill chunk at positions c0 .. c0 + T - 1 had main hidden states h [T, D]: record the
        positions of the prompt's tail among them."""
        start = max(len(prompt) - self.tail, c0)
        c1 = c0 + h.shape[0]
        if start < c1:
            self._record([i], list(range(start, c1)), torch.tensor(prompt[start:c1], device=h.device), h[start - c0:])

    def join(self, i: int, P: int, tok: int) -> None:
        """Slot i's P-token prompt is prefilled (and recorded) and its first token is `tok`: it speculates from
        the next step on (whose drafts first catch its MTP layers up)."""
        self.st.N[i], self.st.tok[i] = P, tok
        self.fresh[i] = 0

    def plain(self, n: int, rows: list[int], pos: list[int], ids: list[int], new: list[int], h: torch.Tensor) -> None:
        """Speculating rows took a plain step (k = 0) in a decode forward over bucket n: ids at positions pos
        were run, new are their next tokens, h [n, 1, D] the forward's hidden states."""
        dev = h.device
        r = torch.tensor(rows, device=dev)
        self._record(rows, pos, torch.tensor(ids, device=dev), h[r, -1])
        self.st.N[r] = torch.tensor(pos, device=dev) + 1
        self.st.tok[r] = torch.tensor(new, device=dev)
        for i in rows:
            self.fresh[i] = 0
        self.steps_k.append(0)
        self._timing = (n, 0)

    def _record(self, rows: list[int], pos: list[int], ids: torch.Tensor, h: torch.Tensor) -> None:
        """Ring entries: row rows[j] (or rows[0] for all) at position pos[j] held token ids[j], hidden h[j]."""
        r = torch.tensor(rows, device=ids.device).expand(len(pos))
        slot = torch.tensor(pos, device=ids.device) % self.rings.size
        self.rings.ids[r, slot] = ids
        self.rings.h[r, slot] = h.to(self.rings.h.dtype)

    # ------------------------------------------------------------------ adaptive K
    def _ctl(self, n: int) -> AdaptiveK:
        c = self.ctls.get(n)
        if c is None:
            c = AdaptiveK(self.K)
            if self.ctls:  # acceptance is the text's, not the batch's: start from what is known
                c.alpha = list(next(iter(self.ctls.values())).alpha)
            self.ctls[n] = c
        return c

    def choose(self, n: int) -> int:
        """The drafts of the next step whose decode batch bucket is n (fixed K: K; 0: plain step)."""
        return self._ctl(n).choose() if self.adaptive else self.K

    def current(self, n: int) -> int:
        """The controller's current k for bucket n, without counting a decision."""
        return self._ctl(n).k if self.adaptive else self.K

    def timed(self, seconds: float, built: bool = False) -> None:
        """The decode part of a scheduler step (its forwards, catch-ups and output: what a step's choice of k
        changes) took `seconds`: the cost of the speculating rows' k at their batch bucket (adaptive). (A
        catch-up after a stretch of plain steps falls in one step: the median of the costs leaves it out.)
        built: the step captured a graph or compiled a step; its time is not a step's cost and is dropped."""
        if self._timing is not None:
            n, k = self._timing
            if self.adaptive and not built:
                self._ctl(n).timed(k, seconds)
            self._timing = None


    # ------------------------------------------------------------------ the step
    def _groups(self, span, rows: list[int]) -> list[list[int]]:
        """Rows to catch up -> the groups that share a pass: a pass computes every row of the block span()
        gives, so a group grows while its block is at most twice its rows (on CUDA always: a forward's host
        time costs more than the idle rows' arithmetic), as the scheduler groups prefill chunks."""
        groups: list[list[int]] = []
        for i in sorted(rows):
            if groups:
                cand = groups[-1] + [i]
                _, r = span(cand[0], i + 1)
                if self.st.N.device.type == "cuda" or r.cache.B <= 2 * len(cand):
                    groups[-1] = cand
                    continue
            groups.append([i])
        return groups

    def _view(self, a: int, n: int, n_max: int, k: int) -> SpecState:
        """A SpecState over rows [a, a + n) whose tensors are views of self.st's."""
        st = self.st
        return SpecState(K=self.K, N=st.N[a:a + n], N_prev=st.N_prev[a:a + n], tok=st.tok[a:a + n],
                         recent=st.recent[a:a + n], h_main=st.h_main[a:a + n], stash=[t[a:a + n] for t in st.stash],
                         drafts=st.drafts[a:a + n], q=None, seen=None, n_max=n_max, k=k, fresh=k,
                         rings=self.rings.rows(a, a + n))

    def _write(self, a: int, sub: SpecState) -> None:
        """Copy a state over rows [a, a + n) back (a graphed step's outputs are buffers its next replay
        overwrites; drafts are not carried; a step with k drafts leaves k - 1 stash entries, those the next
        step reads)."""
        n = sub.N.shape[0]
        dst, src = _per_row(self.st) + self.st.stash, _per_row(sub) + sub.stash
        # (read every source before writing: a step's N_prev is its old N, a view of self.st.N when the step ran on
        # this state's own views and masked no row)
        own = {t.untyped_storage().data_ptr() for t in dst}
        src = [t.clone() if t.untyped_storage().data_ptr() in own else t for t in src]
        for mine, got in zip(dst, src):
            mine[a:a + n].copy_(got)

    def _catch_up(self, span, behind: list[int], k: int, n_max: int, chunk: int) -> None:
        """Prime MTP layers 0 .. k-1 of the rows `behind` from the rings (speculative.spec_reprime), in one
        batched pass over the block of rows span(lo, hi) gives (its first row, a runner over it), its other rows
        masked."""
        a, runner = span(min(behind), max(behind) + 1)
        n = runner.cache.B
        frozen = torch.ones(n, dtype=torch.bool)
        frozen[[i - a for i in behind]] = False
        sub = self._view(a, n, n_max, k)
        spec_reprime(runner, sub, k, chunk, frozen.to(sub.N.device))
        self._write(a, sub)

    def step(self, runner, rows: list[int], n_max: int, k: int | None = None, chunk: int = 256,
             span=None, special: dict | None = None) -> list[list[int]]:
        """One speculative step with k drafts (default K) for the slots `rows` through `runner` (over cache rows
        [0, n), n > max(rows)); n_max: the largest position of their last tokens. Rows whose MTP layers are
        behind are caught up first (spec_reprime in prompt chunks of `chunk`, through span(lo, hi): (first row,
        a runner) over a block of rows covering [lo, hi); default: `runner`). special: {row: (SamplingParams,
        generator or None, seen [1, V] or None)} for the rows that sample or have a repetition penalty (the
        others are plain greedy). Returns each row's new tokens (1 .. k + 1); row i's j-th one was chosen from
        self.logits[i, j]. With no rows (graph warm-up) nothing changes."""
        k = self.K if k is None else k
        n = runner.cache.B
        st = self.st
        frozen = torch.ones(n, dtype=torch.bool)
        frozen[rows] = False
        frozen = frozen.to(st.N.device)
        behind = [i for i in rows if self.fresh[i] < k]
        if behind:
            t0 = time.perf_counter()
            span = span or (lambda lo, hi: (0, runner))
            for group in self._groups(span, behind):
                self._catch_up(span, group, k, n_max, chunk)
            self.catch_up_seconds += time.perf_counter() - t0
        sub = self._view(0, n, n_max, k)
        params = GREEDY
        if special:
            mine = set(rows)
            params = RowSampling([special.get(i) if i in mine else None for i in range(n)])
        # (a one-row step of that row: no mask, so that verification may take the batch-1 Triton step)
        new, _, counts = spec_step(runner, sub, params, None, None if rows == [0] and n == 1 else frozen)
        self._write(0, sub)
        self.logits = sub.logits
        if rows:
            for i in rows:  # (layers past k did not run)
                self.fresh[i] = k
            self.steps_k.append(k)
            self._timing = (n, k)
            accepted = [counts[i] - 1 for i in rows]
            for c in self.ctls.values():
                c.observe(k, accepted)
        tokens = new.tolist()
        return [tokens[i][:counts[i]] for i in rows]
