"""FP8-resident modules and the swap that installs them: quantize_model_(model).

FP8Linear replaces a projection (same call: y = module(x)); FP8Experts replaces the routed experts (same call:
y = module(x, idx, w)). Their weights stay float8_e4m3fn with fp32 128x128 block scales, named as in the
checkpoint: `weight` + `weight_scale_inv`, `gate_up_proj` + `gate_up_proj_scale_inv`, `down_proj` +
`down_proj_scale_inv`. The swap is applied from outside (a module replaced in its parent, no forward
assigned), so the model classes know nothing of FP8. FP8Experts, like Experts, computes through its
`dispatcher` (fp8_experts here; distributed.inference's expert-parallel one under EP).

Which modules: QUANTIZED_MODULES below, the one table of the rule (matched against qualified module names, so
it holds before and after q/k/v and gate/up fusion). Under tensor/expert parallelism a rank's slice of an FP8
weight is cut by shard_fp8: whole blocks with their scale rows/cols where it falls on block boundaries,
requantized with scales of its own where it does not.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn as nn

from .blocks import BLOCK, FP8, block_aligned, block_box, dequantize_box, quantize, scale_grid
from .gemm import fp8_experts, fp8_linear

# The modules whose weights the release stores in FP8 (SPEC.md, "FP8 block format"): every q/k/v projection
# (separate or fused), the dense SwiGLU projections (separate or fused gate/up) and the routed experts. Not:
# o_proj, the MTP layers' eh_proj, lm_head, embed_tokens, the router (mlp.gate), norms, sinks, biases. (eh_proj:
# SPEC's list does not name it either way; vLLM's and SGLang's MTP modules build it as a plain unquantized
# nn.Linear whose loader has no place for a weight_scale_inv, and checkpoint/names.py stores it unquantized.)
QUANTIZED_MODULES = {
    "linear": re.compile(r"(^|\.)(self_attn\.(q_proj|k_proj|v_proj|qkv_proj)|mlp\.(gate_proj|up_proj|gate_up_proj"
                         r"|down_proj))$"),
    "experts": re.compile(r"(^|\.)mlp\.experts$"),
}


def is_quantized_module(name: str, module: nn.Module) -> str | None:
    """'linear' / 'experts' if the release quantizes module `name`'s weights, else None."""
    if isinstance(module, nn.Linear) and QUANTIZED_MODULES["linear"].search(name):
        return "linear"
    if _is_experts(module) and QUANTIZED_MODULES["experts"].search(name):
        return "experts"
    return None


def _is_experts(m: nn.Module) -> bool:
    """The fused routed experts: 3-D gate_up_proj [E, 2I, D] and down_proj [E, D, I] parameters."""
    gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3


def _keep_fp8(module: nn.Module, names: tuple[str, ...]) -> None:
    """After a dtype cast of the model (model.to(bf16)): FP8 weights back to FP8 (exact: every e4m3 value is
    a bf16/fp16/fp32 value) and scales back to fp32."""
    for n in names:
        t = getattr(module, n)
        if t is not None and t.is_floating_point() and t.dtype != FP8:
            t.data = t.data.to(FP8)
        s = getattr(module, n + "_scale_inv")
        if s.is_floating_point() and s.dtype != torch.float32:
            s.data = s.data.float()


def _fp8_param(shape, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=FP8, device=device), requires_grad=False)


def _scale_param(shape, block, device) -> nn.Parameter:
    return nn.Parameter(torch.ones(scale_grid(tuple(shape), block), dtype=torch.float32, device=device),
                        requires_grad=False)


class FP8Linear(nn.Module):
    """y = x @ (weight * weight_scale_inv per 128x128 block)^T, no bias.

    weight [out, in] float8_e4m3fn, weight_scale_inv [ceil(out/128), ceil(in/128)] fp32. x [..., in] ->
    [..., out] in x's dtype. backend: an fp8_linear backend, "auto" defers to options().fp8_linear.
    """

    def __init__(self, in_features: int, out_features: int, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _fp8_param((out_features, in_features), device)
        self.weight_scale_inv = _scale_param((out_features, in_features), BLOCK, device)
        self.backend = "auto"

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        """Quantize a bias-free linear's weight with real amax/448 block scales (meta weights: shapes only)."""
        if linear.bias is not None:
            raise ValueError("FP8Linear has no bias; the release quantizes only bias-free projections")
        m = cls(linear.in_features, linear.out_features, device=linear.weight.device)
        if linear.weight.device.type != "meta":
            m.load_float_(linear.weight.detach())
        return m

    @torch.no_grad()
    def load_float_(self, w: torch.Tensor) -> None:
        """Quantize float weight w [out, in] into this module (real amax/448 scales)."""
        q, s = quantize(w, BLOCK, "weight")
        self.weight.copy_(q)
        self.weight_scale_inv.copy_(s)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        _keep_fp8(self, ("weight",))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]"""
        from ..options import options
        backend = options().fp8_linear if self.backend == "auto" else self.backend
        return fp8_linear(x, self.weight, self.weight_scale_inv, backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 128x128 blocks"


class FP8Experts(nn.Module):
    """Routed experts with FP8 weights: gate_up_proj [E, 2I, D] (gate rows, then up rows) + gate_up_proj_scale_inv
    [E, ceil(2I/128), ceil(D/128)], down_proj [E, D, I] + down_proj_scale_inv [E, ceil(D/128), ceil(I/128)].
    forward(x [N, D], idx [N, k], w [N, k]) -> [N, D], as the bf16 Experts module.

    `dispatcher` (fp8_experts' signature) computes the routed sum: fp8_experts itself (every expert here), or
    distributed.inference.ExpertParallelInference's FP8 twin (this rank's experts, then the all-reduce),
    installed from outside as Experts' is."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, device=None) -> None:
        super().__init__()
        E, D, I = num_experts, hidden, intermediate
        self.gate_up_proj = _fp8_param((E, 2 * I, D), device)
        self.gate_up_proj_scale_inv = _scale_param((E, 2 * I, D), BLOCK, device)
        self.down_proj = _fp8_param((E, D, I), device)
        self.down_proj_scale_inv = _scale_param((E, D, I), BLOCK, device)
        self.backend = "auto"
        self.dispatcher = fp8_experts

    @classmethod
    def from_experts(cls, experts: nn.Module) -> "FP8Experts":
        E, I2, D = experts.gate_up_proj.shape
        m = cls(E, D, I2 // 2, device=experts.gate_up_proj.device)
        if experts.gate_up_proj.device.type != "meta":
            with torch.no_grad():
                for name in ("gate_up_proj", "down_proj"):
                    q, s = quantize(getattr(experts, name).detach(), BLOCK, name)
                    getattr(m, name).copy_(q)
                    getattr(m, name + "_scale_inv").copy_(s)
        return m

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        _keep_fp8(self, ("gate_up_proj", "down_proj"))
        return self

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [N, D], idx [N, k], w [N, k] -> [N, D]"""
        from ..options import options
        backend = options().fp8_experts if self.backend == "auto" else self.backend
        return self.dispatcher(x, idx, w, self.gate_up_proj, self.gate_up_proj_scale_inv, self.down_proj,
                               self.down_proj_scale_inv, backend)


def quantize_model_(model: nn.Module, include: Callable[[str], bool] | None = None) -> list[str]:
    """Swap every module the release quantizes (QUANTIZED_MODULES) for its FP8 twin, in place.

    Weights on a real device are quantized with real amax/448 block scales; on the meta device only the
    structure changes (the loader fills the FP8 tensors). include(name), when given, narrows the set (the
    loader keeps a tensor the checkpoint stores unquantized as it is). Returns the swapped module names.
    """
    swaps = []
    for name, m in model.named_modules():
        kind = is_quantized_module(name, m)
        if kind is not None and (include is None or include(name)):
            swaps.append((name, kind))
    for name, kind in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        new = FP8Linear.from_linear(old) if kind == "linear" else FP8Experts.from_experts(old)
        setattr(parent, child, new)
    return [n for n, _ in swaps]


def shard_fp8(q: torch.Tensor, s: torch.Tensor, pieces, shape: tuple[int, ...],
              block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank's local FP8 tensor [shape] and its scale grid from the full q [..., R, C] + s, where each piece
    (checkpoint.slices.Piece) says local[piece.local] = full[piece.full].

    Where every piece starts and ends on block boundaries (locally and in the full tensor; quant.blocks.
    block_aligned) the FP8 bytes and their scale rows/cols are copied as they are: the shard computes with the
    same numbers as the whole. Otherwise (a k slice of a 192-row kv head; an intermediate share that is not a
    multiple of 128) the covering blocks are dequantized, the local tensor assembled in fp32 and quantized
    again with scales of its own (real amax/448, what vLLM does): an FP8 rounding of the original values."""
    ql = torch.empty(shape, dtype=FP8, device=q.device)
    sl = torch.empty(scale_grid(tuple(shape), block), dtype=torch.float32, device=q.device)
    if all(block_aligned(p.full, p.local, tuple(q.shape), tuple(shape), block) for p in pieces):
        for p in pieces:
            ql[p.local] = q[p.full]
            sl[block_box(p.local, block)] = s[block_box(p.full, block)]
        return ql, sl
    staging = torch.zeros(shape, dtype=torch.float32, device=q.device)
    for p in pieces:
        staging[p.local] = dequantize_box(q, s, p.full, block)
    return quantize(staging, block, "FP8 shard")
