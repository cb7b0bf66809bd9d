"""MTP speculative decoding for the serving scheduler's slots (Scheduler(speculative_k=K)).

The algorithm is generation/speculative.py's; this module keeps its state for a scheduler whose rows come
and go. One SpecState covers every row of the scheduler's KVCache; row i is live while slot i speculates.
  - A slot qualifies (`qualifies`) when its request is plain greedy: no sampling, no repetition penalty, no
    logprobs. (Sampled rows would need each row's draws from its own generator to stay independent of its
    neighbours, which the batched accept step does not do; they decode through the plain path.)
  - While its prompt is prefilled the slot keeps the main model's hidden states of the prompt's last `tail`
    positions (`tail_part`); after the prefill's token, `join` primes the MTP layers over them
    (speculative.spec_enter) and writes the row's state.
  - Each scheduler step, `step` drafts K tokens for every speculating row, verifies K + 1 in one main
    forward over rows [0, n) and accepts per row; every other row of [0, n) is frozen: masked out of the
    forwards, its cache and state untouched. It returns each row's new tokens (1 .. K + 1).
A slot that finishes just stops being passed to `step`; the next request in its slot joins afresh (its
cache row, MTP rings included, is reset at admission).

The prefix cache stores the main model's layers only: a speculating slot restores at most `P - tail`
prompt positions from it (Scheduler._admit), so the tail is always prefilled and its hidden states exist.
"""

from __future__ import annotations

import torch

from ..generation.sampling import SamplingParams
from ..generation.speculative import SpecState, spec_enter, spec_step

_GREEDY = SamplingParams(do_sample=False)


def _per_row(st: SpecState) -> list[torch.Tensor]:
    """A greedy SpecState's per-row tensors (each [B, ...]), in one order."""
    return [st.N, st.N_prev, st.tok, st.recent, st.h_main, st.drafts, *st.stash]


class SpecSlots:
    """Speculative state of `B` cache rows for K drafts per step. tail: prompt positions whose hidden states
    join() needs (K * sliding_window, see spec_enter)."""

    def __init__(self, model, K: int, B: int) -> None:
        config = model.config
        if not isinstance(K, int) or isinstance(K, bool) or not 0 < K <= config.num_nextn_predict_layers:
            raise ValueError(f"speculative_k={K!r}: speculation drafts with the MTP layers, of which the model has "
                             f"{config.num_nextn_predict_layers}; use 0 (off) .. {config.num_nextn_predict_layers}")
        self.K = K
        self.tail = K * config.sliding_window
        dev, D = model.device, config.hidden_size
        z = torch.zeros(B, dtype=torch.long, device=dev)
        h = torch.zeros(B, D, dtype=model.dtype, device=dev)
        self.st = SpecState(K=K, N=z, N_prev=z.clone(), tok=z.clone(),
                            recent=torch.zeros(B, K + 1, dtype=torch.long, device=dev),
                            h_main=torch.zeros(B, K + 1, D, dtype=model.dtype, device=dev),
                            stash=[h.clone() for _ in range(K - 1)],
                            drafts=torch.zeros(B, K, dtype=torch.long, device=dev), q=None, seen=None, n_max=0)

    @staticmethod
    def qualifies(req) -> bool:
        """Whether a request decodes speculatively: greedy, no repetition penalty, no logprobs."""
        p = req.params
        return (not p.do_sample and (p.repetition_penalty is None or p.repetition_penalty == 1.0)
                and req.logprobs is None)

    def tail_part(self, c0: int, P: int, h: torch.Tensor) -> list[torch.Tensor]:
        """A prefill chunk at positions c0 .. c0 + T - 1 of a P-token prompt had main hidden states h [T, D]:
        those of the tail (positions >= P - tail), as a list of at most one [t, D] tensor (a copy)."""
        start = max(P - self.tail - c0, 0)
        return [h[start:].clone()] if start < h.shape[0] else []

    def join(self, runner, i: int, prompt: list[int], tok: int, hidden: list[torch.Tensor], chunk: int) -> None:
        """Slot i's prompt is prefilled (hidden: tail_part's pieces, in order) and its first token is `tok`:
        prime the MTP layers through `runner` (over slot i's cache row alone) and write row i's state."""
        h = torch.cat(hidden, 0)[None]  # [1, L, D]
        P, L = len(prompt), h.shape[1]
        if L != min(P, self.tail):
            raise RuntimeError(f"slot {i}: {L} hidden states kept for a prompt tail of {min(P, self.tail)}")
        dev = h.device
        row = spec_enter(runner, torch.tensor([prompt[P - L:]], device=dev), h, torch.tensor([tok], device=dev),
                         P, self.K, chunk)
        for mine, new in zip(_per_row(self.st), _per_row(row), strict=True):
            mine[i] = new[0]

    def step(self, runner, rows: list[int], n_max: int) -> list[list[int]]:
        """One speculative step for the slots `rows` through `runner` (over cache rows [0, n), n > max(rows));
        n_max: the largest position of their last tokens. Returns each row's new tokens (1 .. K + 1)."""
        n = runner.cache.B
        st = self.st
        frozen = torch.ones(n, dtype=torch.bool)
        frozen[rows] = False
        sub = SpecState(K=self.K, N=st.N[:n], N_prev=st.N_prev[:n], tok=st.tok[:n], recent=st.recent[:n],
                        h_main=st.h_main[:n], stash=[t[:n] for t in st.stash], drafts=st.drafts[:n], q=None,
                        seen=None, n_max=n_max)
        new, _, counts = spec_step(runner, sub, _GREEDY, None, frozen.to(st.N.device))
        for mine, got in zip(_per_row(st), _per_row(sub), strict=True):
            mine[:n].copy_(got)  # (a graphed step's outputs are buffers its next replay overwrites)
        tokens = new.tolist()
        return [tokens[i][:counts[i]] for i in rows]
