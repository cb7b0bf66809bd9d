"""Linear (every projection of the model), RMSNorm, the RoPE tables (partial, per-layer-type base; applied in
ops.rope), and the dense SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.norm import rms_norm
from ..ops.swiglu import silu_mul
from ..ops.linear import linear


class Linear(nn.Linear):
    """A projection without bias, weight [out, in]; its product runs through ops.linear. backend "auto" takes
    options().linear (e.g. the fp32 reduction of one-row decode steps); another name fixes it."""

    def __init__(self, in_features: int, out_features: int, backend: str = "auto") -> None:
        super().__init__(in_features, out_features, bias=False)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]"""
        return linear(x, self.weight, self.backend)


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
    """Dense SwiGLU: down(silu(gate) * up), gate and up from one product: gate_up_proj.weight [2I, D] holds
    the gate rows, then the up rows (the checkpoint's gate_proj / up_proj, merged on load: checkpoint/names.py)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate)
        self.down_proj = Linear(intermediate, hidden)
        # sums down_proj's partial outputs over tensor-parallel ranks (distributed.inference sets an AllReduce)
        self.out_reduce: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., hidden] -> [..., hidden]"""
        h = self.gate_up_proj(x)
        return self.out_reduce(self.down_proj(silu_mul(h[..., :self.intermediate], h[..., self.intermediate:])))
