"""What a decode loop hands back to the host: every row's new tokens (Output: EOS and stop handling, streaming,
transformers' padding), and reads of device values that wait for the device only when asked (to_host_later,
Clock), so that a loop can launch its next step first.
"""

from __future__ import annotations

import time
from typing import Callable

import torch


def to_host_later(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A function that returns t's values as of now on the host: on CUDA a pinned copy launched now, waited for
    only when the function is called."""
    if t.device.type != "cuda":
        return lambda: t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record()
    return lambda: ev.synchronize() or host


class Clock:
    """Times between marks without waiting for the GPU at each (a wait after prefill would leave the GPU idle
    while the host launches the first decode graph): CUDA events on the current stream, else the host clock.
    The first mark is made at construction."""

    def __init__(self, device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks (waits for the last one)."""
        if not self.cuda:
            return [b - a for a, b in zip(self.marks, self.marks[1:])]
        self.marks[-1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]


class Output:
    """New tokens of every row, EOS / stop handling and streaming (transformers' padding after EOS)."""

    def __init__(self, B, max_new, eos, pad, streamer, stopping, device, glue=None):
        self.B, self.max_new, self.pad = B, max_new, pad
        # (one column more: the scratch column, where tokens that are not kept are written; nothing reads it)
        self.tokens = torch.full((B, max_new + 1), pad, dtype=torch.long, device=device)
        self.count = torch.zeros(B, dtype=torch.long, device=device)  # tokens kept per row
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self.streamer, self.stopping = streamer, stopping
        self.sync = bool(eos) or streamer is not None or stopping is not None
        self.host_rows: list[list[int]] | None = [[] for _ in range(B)] if stopping is not None else None
        self.glue = glue  # a runner's glue (runner.glue), or None: how _place runs (compiled by a compiling runner)

    def add(self, new: torch.Tensor, count: torch.Tensor) -> None:
        """One step's tokens: new [B, C] candidates, count [B] how many of them each row emits (1 <= count <= C)."""
        self._add(new[None], count[None], False)

    def add_steps(self, new: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """n steps' tokens at once (a graphed chunk of steps; the same as n add() calls, with one set of kernels):
        new [n, B, C], count [n, B]. Returns active [n, B]: the rows still emitting before each step."""
        return self._add(new, count, True)

    def _add(self, new: torch.Tensor, count: torch.Tensor, steps: bool) -> torch.Tensor | None:
        fn = _place
        # compiled for the speculative loops' chunks (a few shapes a runner: steps, rows, drafts + 1), not for the
        # plain loop's one call of max_new tokens (a shape a call), nor where the host's work below reads the tokens
        if self.glue is not None and steps and not self.sync:
            fn = self.glue(("output", *new.shape), _place)
        active, flat, take = fn(self.tokens, self.count, self.done, self.eos, new, count, steps)
        if self.sync:
            if self.streamer is not None:
                self.streamer.put(flat[0][take[0]].tolist())
            if self.stopping is not None:
                for b, (row, kept) in enumerate(zip(flat.tolist(), take.tolist(), strict=True)):
                    self.host_rows[b].extend(t for t, k in zip(row, kept, strict=True) if k)
                stop = torch.tensor(self.stopping(self.host_rows), dtype=torch.bool, device=new.device)
                self.done |= stop
        return active

    def all_done(self) -> bool:
        return bool(self.done.all())

    def all_done_later(self):
        """A function that returns all_done() as of now, and on CUDA waits for the GPU only when called."""
        read = to_host_later(self.done.all())
        return lambda: bool(read())

    def total_new(self) -> int:
        return int(self.count.sum())

    def result(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = int(self.count.max())
        return torch.cat([input_ids, self.tokens[:, :n]], 1)


def _place(tokens, count, done, eos, new, n_new, steps: bool):
    """Output._add's arithmetic, in place: each row's kept tokens of new [n, B, C] (n_new [n, B] a step) written
    after its count into tokens [B, max_new + 1] (the last column: the scratch, where the others go), count [B]
    and done [B] updated (max_new tokens, or an EOS of eos [E] or None). Returns (active [n, B] when steps, else
    None: the rows still emitting before each step; the rows' candidates [B, n * C] and which of them are kept).
    One function, so that a compiling runner's glue makes it a few kernels."""
    n, B, C = new.shape
    max_new = tokens.shape[1] - 1
    ar = torch.arange(n * C, device=new.device)
    flat = new.transpose(0, 1).reshape(B, n * C)  # each row's candidates, step after step
    valid = ar[:C] < n_new.t()[..., None]  # [B, n, C]
    if n == 1:  # (one step: a row's emitted tokens are its first `count`)
        valid, rank = valid.view(B, C), ar[None]
    else:
        valid = valid.reshape(B, n * C)
        rank = valid.cumsum(1) - 1  # among the row's emitted tokens
    valid = valid & ~done[:, None]
    take = valid & (rank < (max_new - count)[:, None])
    if eos is not None:  # cut after the first EOS
        is_eos = torch.isin(flat, eos) & take
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1), n * C)
        take = take & (ar[None] <= first[:, None])
    active = None
    if steps:  # before step j: not done before, fewer than max_new kept, and no EOS kept before it
        per_step = take.view(B, n, C).sum(2)  # [B, n]
        active = ~done[:, None] & (count[:, None] + per_step.cumsum(1) - per_step < max_new)
        if eos is not None:
            eos_step = is_eos.view(B, n, C).any(2).long()  # (is_eos & take: an EOS kept in that step)
            active = active & ((eos_step.cumsum(1) - eos_step) == 0)
        active = active.t()
    idx = torch.where(take, count[:, None] + rank, max_new)  # (not kept: the scratch column)
    tokens.scatter_(1, idx, flat)
    count += take.sum(1)
    done |= count >= max_new
    if eos is not None:
        done |= is_eos.any(1)
    return active, flat, take
