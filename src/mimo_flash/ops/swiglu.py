"""The SwiGLU activation: silu(gate) * up for the dense MLP, and the routing-weighted form of the experts.

The plain bodies are the definition. On CUDA silu_mul runs compiled; swiglu_weighted in half precision runs
two Triton kernels (ops/kernels/swiglu.py: forward; backward with the weights' gradient in the same pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .compiled import acc, cuda_compiled, triton_for


@cuda_compiled
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [..., I] -> silu(gate) * up [..., I]."""
    return F.silu(gate) * up


def swiglu_weighted(h: torch.Tensor, w: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """h [P, 2I] (gate columns, then up), w [P] fp32 -> w * silu(gate) * up [P, I] in h's dtype (fp32 math for half
    inputs). With order [P] (a permutation), row r takes w[order[r]]: w stays in its own order.

    The routing weight is applied before the (linear) down projection, which is the same as after it.
    """
    half = h.dtype in (torch.bfloat16, torch.float16)
    tk = triton_for(h, "swiglu") if half else None
    if tk is not None:
        return tk.swiglu_weighted(h, w, order)
    return _swiglu_weighted(h, w if order is None else w[order])


@cuda_compiled
def _swiglu_weighted(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    gate, up = acc(h).chunk(2, dim=-1)
    return (F.silu(gate) * up * w[:, None]).to(h.dtype)


swiglu_weighted.plain = _swiglu_weighted.plain
