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

    def __init__(self, B, max_new, eos, pad, streamer, stopping, device):
        self.B, self.max_new, self.pad = B, max_new, pad
        self.tokens = torch.full((B, max_new + 8), pad, dtype=torch.long, device=device)  # + room for a step
        self.count = torch.zeros(B, dtype=torch.long, device=device)  # tokens kept per row
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self.streamer, self.stopping = streamer, stopping
        self.sync = bool(eos) or streamer is not None or stopping is not None
        self.host_rows: list[list[int]] | None = [[] for _ in range(B)] if stopping is not None else None

    def add(self, new: torch.Tensor, count: torch.Tensor) -> None:
        """new [B, C] candidate tokens, count [B] how many of them each row emits (1 <= count <= C)."""
        B, C = new.shape
        ar = torch.arange(C, device=new.device)
        take = (ar[None] < count[:, None]) & ~self.done[:, None]
        room = self.max_new - self.count
        take &= ar[None] < room[:, None]
        if self.eos is not None:  # cut after the first EOS
            is_eos = torch.isin(new, self.eos) & take
            first = torch.where(is_eos.any(1), is_eos.float().argmax(1), C)
            take &= ar[None] <= first[:, None]
            finished_eos = is_eos.any(1)
        n_take = take.sum(1)
        if self.tokens.shape[1] < self.max_new + C:
            self.tokens = torch.cat([self.tokens, torch.full_like(self.tokens[:, :C], self.pad)], 1)
        idx = self.count[:, None] + ar[None]  # distinct columns; those not taken keep their pad
        cur = self.tokens.gather(1, idx)
        self.tokens.scatter_(1, idx, torch.where(take, new, cur))
        self.count += n_take
        newly_done = self.count >= self.max_new
        if self.eos is not None:
            newly_done |= finished_eos
        if self.sync:
            if self.streamer is not None:
                self.streamer.put(new[0, : int(n_take[0])].tolist())
            if self.stopping is not None:
                counts = n_take.tolist()
                rows = new.tolist()
                for b in range(B):
                    self.host_rows[b].extend(rows[b][: counts[b]])
                stop = torch.tensor(self.stopping(self.host_rows), dtype=torch.bool, device=new.device)
                newly_done |= stop
        self.done |= newly_done

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
