"""Partial NeoX RoPE, and RoPE of q / k / v straight from one projection's output (with the value scale).

The plain bodies are the definition. On CUDA rope_qkv runs one Triton kernel each way (ops/kernels/rope.py);
rope alone runs compiled. (The "triton" attention backend also takes RoPE's gradient inside its own kernels:
ops/attention.py attention_qkv.)
"""

from __future__ import annotations

import torch

from .compiled import acc, cuda_compiled, kernels, triton_for


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
    three products). On CUDA one Triton kernel each way.
    """
    args = (heads, kv_heads, qk_dim, v_dim, v_scale)
    if triton_for(qkv, "rope") is not None:
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
    gr, gp = acc(g[..., :r]), acc(g[..., r:])
    gs = gr * sin[:, :, None]
    back = torch.cat([gs[..., r // 2:], -gs[..., : r // 2]], dim=-1)
    return torch.cat([gr * cos[:, :, None] + back, gp], dim=-1).flatten(2)


def _rope_qkv_grad(gq, gk, gv, cos, sin, v_scale: float):
    """rope_qkv's input gradient from the gradients of q, k, v (the formulas; ops/kernels/rope.py rope_qkv_grad
    is the CUDA kernel)."""
    out = torch.cat([_rope_grad(gq, cos, sin), _rope_grad(gk, cos, sin), acc(gv).flatten(2) * v_scale], dim=-1)
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
        fn = kernels("rope").rope_qkv if qkv.is_cuda else _rope_qkv  # CPU: the formulas (tests)
        return fn(qkv, cos, sin, heads, kv_heads, qk_dim, v_dim, v_scale)

    @staticmethod
    def backward(ctx, gq, gk, gv):
        cos, sin = ctx.saved_tensors
        grad = (kernels("rope").rope_qkv_grad if gq.is_cuda else _rope_qkv_grad)(gq, gk, gv, cos, sin, ctx.v_scale)
        return grad, None, None, None, None, None, None, None
