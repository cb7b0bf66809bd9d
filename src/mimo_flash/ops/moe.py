"""Mixture-of-experts ops: the sigmoid router with bias-corrected selection, and the expert compute.

Expert weights are fused: gate_up [E, 2I, D] (gate rows first, then up), down [E, D, I].

Expert backends:
    "reference" - a loop over experts, each taking the tokens routed to it (the spec in code).
    "grouped"   - tokens sorted by expert once, then torch._grouped_mm over the groups (GPU, bf16),
                  falling back to a loop over the sorted segments elsewhere.
    "auto"      - grouped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
          norm_topk_prob: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid router. x [N, D], weight [E, D], bias [E] (selection only).

    Returns (indices [N, k] long, weights [N, k] fp32, scores [N, E] fp32).
    """
    logits = F.linear(x.float(), weight.float())
    scores = logits.sigmoid()
    choice = scores + bias.float()
    N, E = choice.shape
    if n_group > 1:
        grouped = choice.view(N, n_group, E // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
        keep = group_scores.topk(topk_group, dim=-1, sorted=False).indices
        gmask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~gmask.repeat_interleave(E // n_group, dim=1), float("-inf"))
    idx = choice.topk(top_k, dim=-1, sorted=False).indices
    w = scores.gather(1, idx)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx, w * scaling, scores


def _expert_ffn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU. x [n, D], gate_up [2I, D], down [D, I] -> [n, D]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def experts_reference(x, idx, w, gate_up, down):
    """x [N, D], idx [N, k], w [N, k] fp32, gate_up [E, 2I, D], down [E, D, I] -> [N, D]."""
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        tok, slot = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        y = _expert_ffn(x[tok], gate_up[e], down[e]) * w[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def sort_by_expert(idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """idx [N, k] -> (order [N*k] into the flattened (token, slot) pairs sorted by expert, counts [E])."""
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def experts_grouped(x, idx, w, gate_up, down):
    """Same contract as experts_reference; one permutation, grouped GEMMs where available."""
    N, k = idx.shape
    E = gate_up.shape[0]
    order, counts = sort_by_expert(idx, E)
    tok = order // k
    xs = x[tok]  # [N*k, D] grouped by expert
    if x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16:
        offs = counts.cumsum(0).to(torch.int32)
        h = torch._grouped_mm(xs, gate_up.transpose(-2, -1), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        ys = torch._grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offs)
    else:
        ys = torch.empty_like(xs)
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                ys[start:start + c] = _expert_ffn(xs[start:start + c], gate_up[e], down[e])
            start += c
    ys = ys * w.reshape(-1)[order, None]
    out = torch.zeros_like(x)
    out.index_add_(0, tok, ys.to(out.dtype))
    return out


EXPERT_BACKENDS = {"reference": experts_reference, "grouped": experts_grouped, "auto": experts_grouped}


def experts(x, idx, w, gate_up, down, backend: str = "auto") -> torch.Tensor:
    """Dispatch; see experts_reference for shapes."""
    try:
        fn = EXPERT_BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown expert backend {backend!r}; choose from {tuple(EXPERT_BACKENDS)}") from None
    return fn(x, idx, w, gate_up, down)
