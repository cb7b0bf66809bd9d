"""A request's slot in the scheduler (serving/scheduler.py): its row of the cache, its sampling state, and what each
new token makes of it: the detokenized text (stop strings held back until they can no longer match), the finish
reason (EOS, a stop string, max_tokens, the context's end), and the logprobs asked for, the prompt's included."""

from __future__ import annotations

import time

import torch

from ..generation.cache import KVCache
from .detok import Detokenizer
from .requests import Request, TopLogprobs


class Slot:
    """Slot i of the scheduler, holding `req` in cache row `row` (a one-row view of the scheduler's cache)."""

    def __init__(self, i: int, req: Request, row: KVCache, tokenizer, device, vocab: int) -> None:
        self.i, self.req, self.row = i, req, row
        self.detok = Detokenizer(tokenizer, req.stop)
        self.done = 0  # prompt tokens prefilled
        self.cached = 0  # of which restored from the prefix cache
        self.decoding = False
        self.order = 0  # admission order: prefill goes oldest first
        self.last = 0  # last token (the next decode step's input) at position `pos`
        self.pos = 0
        self.n_out = 0
        self.first_at = 0.0
        self.prompt_lp: list | None = [None] if req.prompt_logprobs else None
        self.generator = None
        if req.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(int(req.seed))
        self.spec = False  # decodes speculatively (serving/speculate.py)
        self.seen = None
        p = req.params
        if p.repetition_penalty is not None and p.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(req.prompt, device=device)] = True

    @property
    def plain_greedy(self) -> bool:
        return not self.req.params.do_sample and self.seen is None

    @property
    def sampling(self):
        """What sampling.choose_rows takes for this row (None: plain greedy)."""
        return None if self.plain_greedy else (self.req.params, self.generator, self.seen)

    def emit(self, token: int, logits: torch.Tensor | None, context: int) -> tuple[str, list | None, str | None]:
        """Record the slot's next token (at position pos, in a cache of `context` positions). logits [V]: the
        token's step, read for logprobs only (None when none are asked). Returns (the text it completes, its
        logprobs or None, the finish reason or None)."""
        req = self.req
        if self.seen is not None:
            self.seen[0, token] = True
        if self.n_out == 0:
            self.first_at = time.perf_counter()
        self.n_out += 1
        self.last = token
        lps = None
        if req.logprobs is not None:
            lsm = torch.log_softmax(logits.float(), -1)
            lps = [(lsm[token].item(), top_logprobs(lsm, req.logprobs))]
        text = self.detok.add([token])
        finish = None
        if token in req.eos or self.detok.stopped:
            finish = "stop"
        elif self.n_out >= req.max_tokens or self.pos + 1 >= context:
            finish = "length"
        return text, lps, finish

    def add_prompt_logprobs(self, logits: torch.Tensor, c0: int, c1: int) -> None:
        """The logprobs of prompt tokens c0 + 1 .. c1 (those the prompt has) from a prefill chunk's logits
        [c1 - c0, V], with the request's top alternatives."""
        lsm = torch.log_softmax(logits.float(), -1)
        k, prompt = self.req.logprobs or 0, self.req.prompt
        for j in range(min(c1, len(prompt) - 1) - c0):
            self.prompt_lp.append((lsm[j, prompt[c0 + j + 1]].item(), top_logprobs(lsm[j], k)))

    def take_prompt_logprobs(self) -> list | None:
        """The prompt's logprobs, once (the first event carries them)."""
        lp, self.prompt_lp = self.prompt_lp, None
        return lp


def top_logprobs(lsm: torch.Tensor, k: int) -> TopLogprobs:
    """The k most likely tokens of log-probabilities lsm [V], most likely first: [(token, logprob)]."""
    if k <= 0:
        return []
    v, i = lsm.topk(min(k, lsm.shape[-1]))
    return list(zip(i.tolist(), v.tolist(), strict=True))
