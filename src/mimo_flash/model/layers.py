"""RMSNorm, the RoPE tables (partial, per-layer-type base; applied in ops.rope), and the dense SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.norm import rms_norm
from ..ops.swiglu import silu_mul


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), normalised in fp32 then cast back before the weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> [..., dim]"""
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(theta: float, rotary_dim: int) -> torch.Tensor:
    """[rotary_dim // 2] fp32 inverse frequencies."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))


_INV_FREQ: dict[tuple, torch.Tensor] = {}


def _inv_freq_on(theta: float, rotary_dim: int, device: torch.device) -> torch.Tensor:
    """rope_inv_freq computed on the CPU once and kept on `device`: no host-to-device copy per call
    (which a CUDA-graph capture of a training step cannot contain)."""
    if device.type == "cpu" or torch.compiler.is_compiling():
        return rope_inv_freq(theta, rotary_dim)
    key = (float(theta), rotary_dim, str(device))
    if key not in _INV_FREQ:
        _INV_FREQ[key] = rope_inv_freq(theta, rotary_dim).to(device)
    return _INV_FREQ[key]


def rope_cos_sin(position_ids: torch.Tensor, theta: float, rotary_dim: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [B, T] -> cos, sin [B, T, rotary_dim] (NeoX layout: the two halves repeat)."""
    inv = _inv_freq_on(theta, rotary_dim, position_ids.device)
    freqs = position_ids[..., None].float() * inv
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class MLP(nn.Module):
    """Dense SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., hidden] -> [..., hidden]"""
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))
