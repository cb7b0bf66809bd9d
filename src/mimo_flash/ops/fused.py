"""Small elementwise ops, each written once in plain PyTorch and fused on CUDA.

The plain body is the definition (and what runs on CPU). On CUDA an op runs either a Triton kernel of
ops/triton_kernels.py with the same roundings (norms, RoPE of q/k/v, weighted SwiGLU, gather-sum: one
launch each way, cheaper for the host than a compiled graph) or its body through torch.compile, which
turns it and its backward into one or two fused kernels. Set MIMO_FLASH_COMPILE=0 to run the plain bodies
everywhere. Inside an outer torch.compile the plain body runs, so the outer graph inlines it.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import torch.nn.functional as F

COMPILE = os.environ.get("MIMO_FLASH_COMPILE", "1") != "0"


def triton_kernels():
    """The ops.triton_kernels module where triton imports, else None."""
    global _TRITON
    if _TRITON is False:
        try:
            from . import triton_kernels as mod
        except ImportError:
            mod = None
        _TRITON = mod
    return _TRITON


_TRITON = False


def raise_recompile_limits(n: int = 256) -> None:
    """Let dynamo keep up to n compiled variants of a function (shapes, dtypes), not the default 8: the
    small ops below see many shapes (prefill chunks, decode, verification, batch sizes, layer types), and
    with fullgraph=True hitting the limit is an error, not a fallback."""
    import torch._dynamo

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), n))


def cuda_compiled(fn: Callable) -> Callable:
    """Wrap fn so that calls whose first tensor argument is on CUDA run torch.compile(fn)."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled
        if not (COMPILE and args[0].is_cuda) or torch.compiler.is_compiling():
            return fn(*args)
        if compiled is None:
            raise_recompile_limits()
            compiled = torch.compile(fn, fullgraph=True)
        return compiled(*args)

    wrapper.plain = fn
    return wrapper


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Half precisions up to fp32; fp32 and fp64 stay."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def triton_for(x: torch.Tensor):
    """The Triton kernels module for a CUDA tensor outside torch.compile (else None: the plain or compiled body)."""
    return triton_kernels() if x.is_cuda and COMPILE and not torch.compiler.is_compiling() else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> [..., D]: normalise in fp32 (fp64 stays), cast back, then scale by weight.
    On CUDA one Triton kernel each way (ops.triton_kernels.rms_norm, the same roundings)."""
    tk = triton_for(x)
    return tk.rms_norm(x, weight, eps) if tk is not None else _rms_norm(x, weight, eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = _acc(x)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h, weight, eps)) with h = x + y: the residual add and the next norm in one op (on CUDA one
    Triton kernel each way; the backward adds the residual gradient in the same pass)."""
    tk = triton_for(x)
    return tk.add_rms_norm(x, y, weight, eps) if tk is not None and x.dtype == y.dtype else _add_rms_norm(x, y, weight, eps)


def _add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + y
    return h, _rms_norm(h, weight, eps)


rms_norm.plain, add_rms_norm.plain = _rms_norm, _add_rms_norm


@cuda_compiled
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] (heads after tokens: the projections' own layout); cos/sin [B, T, R] with R <= D
    -> [B, T, H, D] (contiguous).

    Rotates dims [0, R) NeoX style (pairs j, j + R/2); dims [R, D) pass through.
    """
    r = cos.shape[-1]
    cos, sin = cos[:, :, None], sin[:, :, None]
    xr, xp = x[..., :r], x[..., r:]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([xr * cos + rotated * sin, xp], dim=-1)


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, qk_dim: int,
             v_dim: int, v_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, T, heads * qk_dim + kv_heads * qk_dim + kv_heads * v_dim] (one projection's output) ->
    q [B, T, heads, qk_dim], k [B, T, kv_heads, qk_dim] through `rope`, v [B, T, kv_heads, v_dim] * v_scale.

    One op for the three, so that its backward hands the projection one gradient [B, T, n] (no sum of
    three products). On CUDA one Triton kernel each way (ops.triton_kernels.rope_qkv / rope_qkv_grad).
    """
    args = (heads, kv_heads, qk_dim, v_dim, v_scale)
    if triton_for(qkv) is not None:
        return _RopeQKV.apply(qkv, cos, sin, *args)
    return _rope_qkv(qkv, cos, sin, *args)


def _rope_qkv(qkv, cos, sin, heads: int, kv_heads: int, qk_dim: int, v_dim: int, v_scale: float):
    B, T, _ = qkv.shape
    nq, nk = heads * qk_dim, kv_heads * qk_dim
    q = rope(qkv[..., :nq].reshape(B, T, heads, qk_dim), cos, sin)
    k = rope(qkv[..., nq:nq + nk].reshape(B, T, kv_heads, qk_dim), cos, sin)
    v = qkv[..., nq + nk:].reshape(B, T, kv_heads, v_dim) * v_scale
    return q, k, v


def _rope_grad(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient through `rope` (a rotation: its transpose) of g [B, T, H, D] -> [B, T, H * D]."""
    r = cos.shape[-1]
    gr, gp = _acc(g[..., :r]), _acc(g[..., r:])
    gs = gr * sin[:, :, None]
    back = torch.cat([gs[..., r // 2:], -gs[..., : r // 2]], dim=-1)
    return torch.cat([gr * cos[:, :, None] + back, gp], dim=-1).flatten(2)


def _rope_qkv_grad(gq, gk, gv, cos, sin, v_scale: float):
    """rope_qkv's input gradient from the gradients of q, k, v (the formulas; ops.triton_kernels.rope_qkv_grad
    is the CUDA kernel)."""
    out = torch.cat([_rope_grad(gq, cos, sin), _rope_grad(gk, cos, sin), _acc(gv).flatten(2) * v_scale], dim=-1)
    return out.to(gq.dtype)


rope_qkv.plain = _rope_qkv


class _RopeQKV(torch.autograd.Function):
    """rope_qkv whose backward writes the one [B, T, n] gradient in a single pass (autograd's own backward
    of the three slices would add three zero-filled [B, T, n] buffers; a compiled concatenation measured
    far below bandwidth)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, heads, kv_heads, qk_dim, v_dim, v_scale):
        ctx.save_for_backward(cos, sin)
        ctx.v_scale = v_scale
        fn = triton_kernels().rope_qkv if qkv.is_cuda else _rope_qkv  # CPU: the formulas (tests)
        return fn(qkv, cos, sin, heads, kv_heads, qk_dim, v_dim, v_scale)

    @staticmethod
    def backward(ctx, gq, gk, gv):
        cos, sin = ctx.saved_tensors
        grad = (triton_kernels().rope_qkv_grad if gq.is_cuda else _rope_qkv_grad)(gq, gk, gv, cos, sin, ctx.v_scale)
        return grad, None, None, None, None, None, None, None


@cuda_compiled
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [..., I] -> silu(gate) * up [..., I]."""
    return F.silu(gate) * up


def swiglu_weighted(h: torch.Tensor, w: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """h [P, 2I] (gate columns, then up), w [P] fp32 -> w * silu(gate) * up [P, I] in h's dtype (fp32 math for half
    inputs). With order [P] (a permutation), row r takes w[order[r]]: w stays in its own order.

    The routing weight is applied before the (linear) down projection, which is the same as after it.
    On CUDA in half precision: two Triton kernels (forward; backward with w's gradient in the same pass).
    """
    half = h.dtype in (torch.bfloat16, torch.float16)
    tk = triton_for(h) if half else None
    if tk is not None:
        return tk.swiglu_weighted(h, w, order)
    return _swiglu_weighted(h, w if order is None else w[order])


@cuda_compiled
def _swiglu_weighted(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    gate, up = _acc(h).chunk(2, dim=-1)
    return (F.silu(gate) * up * w[:, None]).to(h.dtype)


swiglu_weighted.plain = _swiglu_weighted.plain


def gather_sum(y: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """y [P, D], index [N * k] -> out [N, D], out[n] = sum_s y[index[n * k + s]], summed in fp32
    (a Triton kernel on CUDA: each output row reads its k rows once)."""
    tk = triton_for(y)
    if tk is not None:
        return tk.gather_sum(y, index, k)
    return _gather_sum(y, index, k)


@cuda_compiled
def _gather_sum(y: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    return _acc(y[index].view(-1, k, y.shape[-1])).sum(1).to(y.dtype)


@cuda_compiled
def sink_scale(out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """Fold the sink into an attention output computed without it.

    out [B, H, T, Dv], lse [B, H, T] (log-sum-exp of each row's scores), sink [H] ->
    out * sigmoid(lse - sink): the same as a softmax whose denominator also holds exp(sink).
    """
    factor = torch.sigmoid(_acc(lse) - _acc(sink)[:, None])
    return (_acc(out) * factor[..., None]).to(out.dtype)
