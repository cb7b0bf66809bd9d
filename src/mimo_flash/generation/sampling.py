"""Logits processing and sampling, in transformers' order: repetition penalty, then temperature,
top-k, top-p, min-p. Greedy decoding takes the argmax after the repetition penalty."""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass

import torch


@dataclass
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    @classmethod
    def from_request(cls, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                     min_p: float | None = None, repetition_penalty: float | None = None) -> "SamplingParams":
        """The convention of the command line and the OpenAI API: temperature 0 means greedy. Every value is
        checked (a NaN temperature is an error, not greedy decoding)."""
        if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature={temperature!r}: must be a finite number >= 0 (0 = greedy)")
        sample = temperature > 0
        return cls(sample, temperature if sample else 1.0, top_k, top_p, min_p, repetition_penalty).validate()

    def validate(self) -> "SamplingParams":
        """Every field checked, whether or not sampling is on: numbers must be finite and in range."""
        def bad(name, value, why):
            raise ValueError(f"{name}={value!r}: {why}")

        if not isinstance(self.do_sample, bool):
            bad("do_sample", self.do_sample, "must be True or False")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature <= 0:
            bad("temperature", self.temperature, "must be a finite number > 0 (use do_sample=False for greedy)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)
                                       or self.top_k < 1):
            bad("top_k", self.top_k, "must be an integer >= 1 (or None)")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            bad("top_p", self.top_p, "must be a number in (0, 1] (or None)")
        if self.min_p is not None and (not _is_number(self.min_p) or not 0 <= self.min_p <= 1):
            bad("min_p", self.min_p, "must be a number in [0, 1] (or None)")
        if self.repetition_penalty is not None and (
                not _is_number(self.repetition_penalty) or not math.isfinite(self.repetition_penalty)
                or self.repetition_penalty <= 0):
            bad("repetition_penalty", self.repetition_penalty, "must be a finite number > 0 (or None)")
        return self


GREEDY = SamplingParams()  # greedy decoding, no penalty


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [..., V] fp32, seen [..., V] bool (tokens already in the sequence) -> penalised logits."""
    pen = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, pen, logits)


def warp(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on logits [..., V] fp32 -> logits with removed tokens at -inf."""
    x = logits / p.temperature if p.temperature != 1.0 else logits
    if p.top_k is not None and p.top_k < x.shape[-1]:
        kth = x.topk(p.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p is not None and p.top_p < 1.0:
        sx, si = torch.sort(x, dim=-1, descending=False, stable=True)  # (stable: ties as alone, in any batch)
        cum = sx.softmax(-1).cumsum(-1)
        remove = cum <= (1 - p.top_p)
        remove[..., -1] = False  # keep at least the top token
        x = x.masked_fill(remove.scatter(-1, si, remove), float("-inf"))
    if p.min_p is not None and p.min_p > 0:
        probs = x.softmax(-1)
        remove = probs < p.min_p * probs.amax(-1, keepdim=True)
        remove.scatter_(-1, probs.argmax(-1, keepdim=True), False)
        x = x.masked_fill(remove, float("-inf"))
    return x


def process(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """logits [..., V] (any float dtype) -> processed fp32 logits (penalty; then warpers when sampling)."""
    x = logits.float()
    if p.repetition_penalty is not None and p.repetition_penalty != 1.0 and seen is not None:
        x = apply_repetition_penalty(x, seen, p.repetition_penalty)
    if p.do_sample:
        x = warp(x, p)
    return x


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None | list) -> torch.Tensor:
    """probs [N, V] (rows sum to 1) -> [N] long: the draw torch.multinomial(probs, 1, generator=generator) makes
    (its own method for one sample: argmax(probs / q), q ~ Exp(1) from the generator), without the host sync in
    which multinomial first checks the probabilities (on CUDA one per call: one per row and step in a server).
    generator: one for the batch, or a list of one per row (see exponentials)."""
    return (probs / exponentials(probs.shape[0], probs.shape[-1], probs.device, generator)).argmax(-1)


def exponentials(n: int, V: int, device, generator: torch.Generator | None | list) -> torch.Tensor:
    """Exp(1) noise [n, V] fp32, sample_from_probs' draw: from one generator for the batch (None: the default), or
    (a list of one per row) row j's from generators[j] alone (a [1, V] draw, as the row alone makes), the rows
    without one from the default generator in one draw."""
    if not isinstance(generator, list):
        return torch.empty(n, V, dtype=torch.float32, device=device).exponential_(1, generator=generator)
    free = [j for j, g in enumerate(generator) if g is None]
    shared = torch.empty(len(free), V, dtype=torch.float32, device=device).exponential_(1)
    if len(free) == n:
        return shared
    part = {j: shared[m:m + 1] for m, j in enumerate(free)}
    return torch.cat([part[j] if g is None else
                      torch.empty(1, V, dtype=torch.float32, device=device).exponential_(1, generator=g)
                      for j, g in enumerate(generator)])


def uniforms(n: int, k: int, generator: torch.Generator | None | list, device) -> torch.Tensor:
    """[n, k] uniform in [0, 1): from one generator for the batch, or (a list of one per row) row j's from
    generators[j] alone (a [1, k] draw, as the row alone makes), the rows without one from the default generator."""
    if not isinstance(generator, list):
        return torch.rand(n, k, device=device, generator=generator)
    free = [j for j, g in enumerate(generator) if g is None]
    shared = torch.rand(len(free), k, device=device)
    part = {j: shared[m:m + 1] for m, j in enumerate(free)}
    return torch.cat([part[j] if g is None else torch.rand(1, k, device=device, generator=g)
                      for j, g in enumerate(generator)])


def eager(key, fn):
    """Runner.glue's signature for code that runs as it is (a compiling runner's glue compiles fn once per key)."""
    return fn


def sample_token(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None, generator,
                 glue=eager) -> torch.Tensor:
    """logits [N, V] -> next tokens [N]: the argmax of process(logits, p, seen) when greedy, else a sample of its
    softmax (sample_from_probs' draw from generator, made first and outside glue: a compiled function draws
    nothing, so the tokens are the generator's wherever this runs). glue (Runner.glue) may fuse the arithmetic:
    a sampled step's processing and draw in one or two kernels in place of a handful."""
    if not p.do_sample:
        return process(logits, p, seen).argmax(-1)
    noise = exponentials(logits.shape[0], logits.shape[-1], logits.device, generator)
    key = ("sample", *logits.shape, *astuple(p), seen is None)
    return glue(key, _sample_drawn)(logits, p, seen, noise)


def _sample_drawn(logits, p: SamplingParams, seen, noise):
    return (process(logits, p, seen).softmax(-1) / noise).argmax(-1)


Row = tuple  # (SamplingParams, torch.Generator | None, seen [1, V] bool | None)


def choose_rows(logits: torch.Tensor, rows: list[Row | None]) -> torch.Tensor:
    """logits [N, V], each row with its own parameters, generator and seen tokens (rows[i] None: greedy) ->
    next tokens [N] long, row i's being sample_token(logits[i:i+1], params, seen, generator), with no
    host sync: rows of equal parameters are processed together (row-wise ops: a row's values do not depend on
    its neighbours), each row with a generator draws from it alone, the others from the default generator in
    one call. A batch of requests (the server's slots) samples in a few kernels instead of a loop over rows."""
    rows = [r if r is not None else (GREEDY, None, None) for r in rows]
    out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    for idx, at in row_groups(rows, logits.device):
        p, _, seen = rows[idx[0]]
        x = logits if at is None else logits[at]
        seen = None if seen is None else torch.cat([rows[i][2] for i in idx])
        if not p.do_sample:
            tok = (x if seen is None else process(x, p, seen)).argmax(-1)
        else:
            probs = process(x, p, seen).softmax(-1)
            tok = sample_from_probs(probs, [rows[i][1] for i in idx])
        if at is None:
            return tok
        out[at] = tok
    return out


def row_groups(rows: list[Row], device) -> list[tuple[list[int], torch.Tensor | None]]:
    """The rows of equal parameters (and with or without seen tokens), each group as (its row numbers, their index
    on the device, None when the group is every row). Its key is a tuple of plain values: cheap per row and step."""
    groups: dict[tuple, list[int]] = {}
    for i, (p, _, seen) in enumerate(rows):
        key = (p.do_sample, p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, seen is None)
        groups.setdefault(key, []).append(i)
    return [(idx, None if len(idx) == len(rows) else _index(idx, device)) for idx in groups.values()]


def _index(idx: list[int], device) -> torch.Tensor:
    """A list of ints on the device without waiting for it (a plain copy to a GPU waits for its stream)."""
    t = torch.tensor(idx, dtype=torch.long, pin_memory=device.type == "cuda")
    return t.to(device, non_blocking=True)
