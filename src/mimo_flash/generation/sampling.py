"""Logits processing and sampling, in transformers' order: repetition penalty, then temperature,
top-k, top-p, min-p. Greedy decoding takes the argmax after the repetition penalty."""

from __future__ import annotations

import math
from dataclasses import dataclass

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
        sx, si = torch.sort(x, dim=-1, descending=False)
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


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs [N, V] (rows sum to 1) -> [N] long."""
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def choose(processed: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Processed logits [N, V] -> next tokens [N]: argmax when greedy, else a sample."""
    if not p.do_sample:
        return processed.argmax(-1)
    return sample_from_probs(processed.softmax(-1), generator)
