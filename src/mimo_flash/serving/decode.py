"""A serving scheduler's decode steps (serving/scheduler.py, steps 4 and 5 of its docstring): one plain step over
the decoding slots, the same launched one step ahead of the host's output work (overlap), and one MTP-speculative
step. Scheduler inherits them from DecodeSteps; they read and write its slots, runners and counters:
slots, S, device, overlap, spec, chunk, prefill, metrics, decode_forwards, ahead_rows, ahead_dropped, the step in
flight (_inflight) and its tokens on the device (_ahead_tok), and call its _bucket, _runner and _take."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..generation.sampling import choose_rows
from .slots import Slot


@dataclass
class _Inflight:
    """A launched decode step (DecodeSteps._decode_ahead): (slot, input position) per row, the tokens
    [rows] on their way to the host, the event after their copy (None on CPU)."""

    rows: list[tuple[Slot, int]]
    host: torch.Tensor
    done: object


class DecodeSteps:
    """The decode steps of Scheduler (see the module docstring for what they use of it)."""

    def _decode(self, with_spec: bool = False) -> None:
        """One plain decode step: the slots that do not speculate, and (with_spec: k = 0) those that do."""
        active = [s for s in self.slots if s is not None and s.decoding and (with_spec or not s.spec)]
        if self.overlap and active and all(s.seen is None and s.req.logprobs is None and not s.spec for s in active):
            self._decode_ahead(active)
            return
        self._flush()
        if not active:
            return
        n = self._bucket(max(s.i for s in active) + 1)  # slots are taken lowest first: few rows, small batch
        tok, pos, valid = [0] * n, [0] * n, [0] * n
        for s in active:
            tok[s.i], pos[s.i], valid[s.i] = s.last, s.pos, 1
        x = torch.tensor([tok, pos, valid], device=self.device)[:, :, None]  # one host-to-device copy
        ids, P = x[0], x[1]
        # a row mask even when every row runs: one graph (one compile) per batch bucket, not two; one row (the
        # batch-1 Triton step's shape) is always full
        v = None if n == 1 else x[2] != 0
        logits, h = self._runner(n).main(ids, P, v, max(pos) + 1, logits="last", graph=True)
        self.decode_forwards += 1
        logits = logits[:, -1]
        rows = [None] * n
        for s in active:
            rows[s.i] = s.sampling
        toks = choose_rows(logits, rows).tolist()  # every row's token, sampled or not: one host sync
        spec = [s for s in active if s.spec]
        pos0, ids0 = [s.pos for s in spec], [s.last for s in spec]
        for s in active:
            s.pos += 1
            # (a row view only where it is read: indexing a device tensor costs microseconds per slot)
            self._take(s, None if s.req.logprobs is None else logits[s.i], toks[s.i])
        if spec:  # (k = 0) their tokens and hidden states go to the rings (s.last: the token just taken)
            self.spec.plain(n, [s.i for s in spec], pos0, ids0, [s.last for s in spec], h)
            with self.metrics.lock:
                self.metrics.spec_steps[0] = self.metrics.spec_steps.get(0, 0) + 1

    def _decode_ahead(self, active: list[Slot]) -> None:
        """A decode step launched before the tokens of the step in flight are taken (overlap): rows in that step
        read their input token from it on the device, at the position after its input's. Sampled rows draw on the
        device too (a row ended by EOS or a stop string in the step in flight draws once for nothing)."""
        prev = self._inflight
        ahead = {} if prev is None else {s.i: p + 1 for s, p in prev.rows if self.slots[s.i] is s}
        rows = []
        for s in active:
            if s.i not in ahead:
                rows.append((s, s.pos))
            elif s.n_out + 1 < s.req.max_tokens and ahead[s.i] + 1 < self.S:  # (else _take ends it by length)
                rows.append((s, ahead[s.i]))
        if not rows:
            self._flush()
            return
        n = self._bucket(max(s.i for s, _ in rows) + 1)
        tok, pos, valid, dev = [0] * n, [0] * n, [0] * n, [0] * n
        for s, p in rows:
            tok[s.i], pos[s.i], valid[s.i], dev[s.i] = s.last, p, 1, int(s.i in ahead)
        x = torch.tensor([tok, pos, valid, dev], device=self.device)[:, :, None]  # one host-to-device copy
        ids = torch.where(x[3] != 0, self._ahead_tok[:n, None], x[0])
        v = None if n == 1 else x[2] != 0
        logits, _ = self._runner(n).main(ids, x[1], v, max(pos) + 1, logits="last", graph=True)
        self.decode_forwards += 1
        sampling = [None] * n
        for s, _ in rows:
            sampling[s.i] = s.sampling
        new = choose_rows(logits[:, -1], sampling)
        self._ahead_tok[:n].copy_(new)
        if self.device.type == "cuda":  # to the host without waiting: the host waits when it takes them
            host = torch.empty(n, dtype=torch.long, pin_memory=True)
            host.copy_(new, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = new, None
        self._inflight = _Inflight(rows, host, done)
        self.ahead_rows += sum(s.i in ahead for s, _ in rows)
        if prev is not None:
            self._take_inflight(prev)

    def _flush(self) -> None:
        """Take the tokens of the decode step in flight, if any."""
        if self._inflight is not None:
            prev, self._inflight = self._inflight, None
            self._take_inflight(prev)

    def _take_inflight(self, step: _Inflight) -> None:
        if step.done is not None:
            step.done.synchronize()
        toks = step.host.tolist()
        for s, p in step.rows:
            if self.slots[s.i] is not s:  # ended by an earlier token (stop, EOS) or cancelled: dropped
                self.ahead_dropped += 1
                continue
            assert s.pos == p, (s.pos, p)
            s.pos += 1
            self._take(s, None, toks[s.i])

    def _speculate(self, k: int) -> None:
        """One speculative step with k > 0 drafts for the slots that speculate (the module docstring's step 5)."""
        active = [s for s in self.slots if s is not None and s.decoding and s.spec]
        if not active:
            return
        n = self._bucket(max(s.i for s in active) + 1)
        special = {s.i: (s.req.params, s.generator, s.seen) for s in active if not s.plain_greedy}
        new = self.spec.step(self._runner(n), [s.i for s in active], max(s.pos for s in active), k, self.chunk,
                             self.prefill.span, special)
        logits = self.spec.logits
        self.decode_forwards += 1
        with self.metrics.lock:
            self.metrics.spec_draft_tokens += k * len(active)
            self.metrics.spec_steps[k] = self.metrics.spec_steps.get(k, 0) + 1
            self.metrics.spec_accepted_tokens += sum(len(t) - 1 for t in new)
        for s, tokens in zip(active, new, strict=True):
            for j, token in enumerate(tokens):
                if self.slots[s.i] is not s:  # finished (EOS, stop string, length): the rest is dropped
                    break
                s.pos += 1
                self._take(s, None if s.req.logprobs is None else logits[s.i, j], token)
