"""RMSNorm, and the residual add fused with the norm that reads its sum.

The plain bodies are the definition (fp32 normalisation, fp64 stays; cast back, then times the weight). On
CUDA one Triton kernel each way (ops/kernels/norm.py) with the same roundings; the backward of add_rms_norm
adds the residual's gradient in the same pass.
"""

from __future__ import annotations

import torch

from .compiled import acc, triton_for


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> [..., D]: normalise in fp32 (fp64 stays), cast back, then scale by weight."""
    tk = triton_for(x, "norm")
    return tk.rms_norm(x, weight, eps) if tk is not None else _rms_norm(x, weight, eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = acc(x)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y [..., D], weight [D] -> (h, rms_norm(h, weight, eps)) with h = x + y: the residual add and the next
    norm in one op."""
    tk = triton_for(x, "norm")
    return tk.add_rms_norm(x, y, weight, eps) if tk is not None and x.dtype == y.dtype else _add_rms_norm(x, y, weight, eps)


def _add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + y
    return h, _rms_norm(h, weight, eps)


rms_norm.plain, add_rms_norm.plain = _rms_norm, _add_rms_norm
