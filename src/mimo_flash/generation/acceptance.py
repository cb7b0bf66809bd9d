"""The rules of MTP speculation that draw drafts and accept them (generation/speculative.py runs them in its steps).

Greedy: a draft is the MTP layer's argmax; the longest prefix of drafts equal to the target's argmax is accepted,
then the target's token after it. Sampling: a draft is drawn from the processed MTP distribution q; d_j is accepted
with probability min(1, p_j(d_j) / q_j(d_j)), and at the first rejection the token is drawn from
norm(max(0, p_j - q_j)) (else, all accepted, from p_K): the emitted tokens follow the target distribution exactly
(Leviathan et al. 2023; Chen et al. 2023). RowSampling applies them to a batch whose rows each have their own
parameters and generator (the serving scheduler's slots).
"""

from __future__ import annotations

from dataclasses import astuple

import torch
import torch.nn.functional as F

from .sampling import GREEDY, SamplingParams, eager, exponentials, process, row_groups, uniforms


def greedy_accept(logits: torch.Tensor, d: torch.Tensor):
    """Verification logits [B, k+1, V] (any float dtype; processed where a penalty applies) of drafts d [B, k] ->
    (drafts accepted a [B], the target's token after them y [B])."""
    k = d.shape[1]
    g = logits.float().argmax(-1)
    a = torch.cumprod((d == g[:, :k]).long(), 1).sum(1)
    return a, g.gather(1, a[:, None])[:, 0]


class RowSampling:
    """Sampling for a speculative step whose rows each carry their own parameters, generator and seen tokens (the
    serving scheduler's slots), in place of one SamplingParams, generator and seen tensor for the batch:
    rows[b] = (params, generator or None, seen [1, V] bool or None) or None for a frozen (or plain greedy) row;
    seen: the tokens of row b's sequence up to x_N (its repetition penalty; the caller adds the tokens it takes).
    Rows of equal parameters go through the batched rules together (draft_token, accept on their rows), each
    row's random numbers drawn from its own generator (sampling.row_groups, exponentials and uniforms with a
    list of generators), so its samples do not depend on the other rows. Eager, never in a graph: a few kernels
    per group of parameters and per seeded row, no host sync."""

    do_sample = True

    def __init__(self, rows: list) -> None:
        self.rows = [r if r is not None else (GREEDY, None, None) for r in rows]

    def _groups(self, device):
        """(params, row numbers, their index or None for all rows, seen [n, V] or None, generators) per group."""
        for idx, at in row_groups(self.rows, device):
            params, _, seen = self.rows[idx[0]]
            seen = None if seen is None else torch.cat([self.rows[b][2] for b in idx])
            yield params, at, seen, [self.rows[b][1] for b in idx]

    def draft(self, logits: torch.Tensor):
        """logits [B, V] -> (tokens [B], probabilities [B, V]: one-hot for greedy and frozen rows)."""
        B, V = logits.shape
        toks = torch.empty(B, dtype=torch.long, device=logits.device)
        qs = torch.empty(B, V, dtype=torch.float32, device=logits.device)
        for params, at, seen, gens in self._groups(logits.device):
            t, q = draft_token(logits if at is None else logits[at], params, seen, gens)
            q = F.one_hot(t, V).float() if q is None else q
            if at is None:
                return t, q
            toks[at], qs[at] = t, q
        return toks, qs

    def accept(self, logits: torch.Tensor, d: torch.Tensor, q: torch.Tensor | None):
        """Verification logits [B, k+1, V], drafts d [B, k], their probabilities q [B, k, V] -> (drafts accepted
        a [B], the token after them y [B])."""
        B, V = d.shape[0], logits.shape[-1]
        a = torch.empty(B, dtype=torch.long, device=d.device)
        y = torch.empty(B, dtype=torch.long, device=d.device)
        for params, at, seen, gens in self._groups(d.device):
            sub = (lambda t: t) if at is None else (lambda t: t[at])  # noqa: E731  (the group's rows)
            seen_j = None if seen is None else seen_prefixes(seen, sub(d), V)
            ag, yg = accept(sub(logits), sub(d), None if q is None else sub(q), params, gens, seen_j)
            if at is None:
                return ag, yg
            a[at], y[at] = ag, yg
        return a, y


def seen_prefixes(seen: torch.Tensor, d: torch.Tensor, V: int) -> torch.Tensor:
    """seen [B, V] (the tokens up to x_N), drafts d [B, k] -> [B, k + 1, V]: the tokens before each verified
    column (column j also has d_1 .. d_j), for the repetition penalty of its target distribution."""
    oh = F.one_hot(d, V).bool()
    none = torch.zeros(d.shape[0], 1, V, dtype=torch.bool, device=d.device)
    return seen[:, None] | torch.cat([none, oh.cumsum(1).bool()], 1)


def draft_token(logits: torch.Tensor, params: SamplingParams, seen, generator, glue=eager):
    """logits [B, V] -> (tokens [B], probabilities [B, V] or None when greedy). generator: the batch's, or a list of
    one per row (RowSampling's groups). glue (Runner.glue) may fuse the arithmetic; the draw is made before it."""
    if isinstance(params, RowSampling):
        return params.draft(logits)
    if not params.do_sample:
        return process(logits, params, seen).argmax(-1), None
    noise = exponentials(logits.shape[0], logits.shape[-1], logits.device, generator)
    key = ("draft", *logits.shape, *astuple(params), seen is None)
    return glue(key, _draft_drawn)(logits, params, seen, noise)


def _draft_drawn(logits, params: SamplingParams, seen, noise):
    q = process(logits, params, seen).softmax(-1)
    return (q / noise).argmax(-1), q


def accept(logits, d, q, params: SamplingParams, generator, seen_j, glue=eager):
    """Verification logits [B, k+1, V] of drafts d [B, k] (probabilities q [B, k, V] when sampling) ->
    (drafts accepted a [B], the token after them y [B]), for the batch's one params; generator: the batch's, or a
    list of one per row (RowSampling). The random numbers are drawn first (uniforms, then the final token's
    Exp(1) noise), outside glue (Runner.glue), which may fuse the rest."""
    B, k = d.shape
    if not params.do_sample:
        return greedy_accept(process(logits.float(), params, seen_j), d)
    u = uniforms(B, k, generator, d.device) if k else None
    noise = exponentials(B, logits.shape[-1], d.device, generator)
    key = ("accept", *logits.shape, *astuple(params), seen_j is None)
    return glue(key, _accept_drawn)(logits, d, q, params, seen_j, u, noise)


def _accept_drawn(logits, d, q, params: SamplingParams, seen_j, u, noise):
    B, k = d.shape
    p = process(logits.float(), params, seen_j).softmax(-1)  # [B, k+1, V]
    if k == 0:
        return torch.zeros(B, dtype=torch.long, device=d.device), (p[:, 0] / noise).argmax(-1)
    pd = p[:, :k].gather(2, d[..., None])[..., 0]
    qd = q.gather(2, d[..., None])[..., 0]
    a = torch.cumprod((u * qd < pd).long(), 1).sum(1)
    r = (p[:, :k] - q).clamp_min(0)
    rs = r.sum(-1, keepdim=True)
    r = torch.where(rs > 0, r / rs.clamp_min(1e-30), p[:, :k])
    dist = torch.cat([r, p[:, k:]], 1).gather(1, a[:, None, None].expand(B, 1, p.shape[-1]))[:, 0]
    return a, (dist / noise).argmax(-1)  # sample_from_probs' draw
