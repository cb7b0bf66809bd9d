"""The routing-weighted SwiGLU of the experts (ops/swiglu.py swiglu_weighted on CUDA): forward, and a backward
that also gives the weights' gradient, one kernel each."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import last_dim_contiguous, launcher


@triton.jit
def _swiglu_rows(H, W, ORDER, rows, P, stride_h, I: tl.constexpr, HAS_ORDER: tl.constexpr, BLOCK_I: tl.constexpr):
    """Rows `rows` of h [P, 2I]: gate, up [BLOCK_R, BLOCK_I] fp32, each row's place in W (ORDER[row], else
    the row itself), its w [BLOCK_R] fp32, mask, column offsets."""
    cols = tl.arange(0, BLOCK_I)
    rmask = rows < P
    mask = rmask[:, None] & (cols < I)[None, :]
    h = H + rows.to(tl.int64)[:, None] * stride_h + cols[None, :]
    gate = tl.load(h, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h + I, mask=mask, other=0.0).to(tl.float32)
    wrow = tl.load(ORDER + rows, mask=rmask, other=0) if HAS_ORDER else rows
    w = tl.load(W + wrow, mask=rmask, other=0.0).to(tl.float32)
    return gate, up, wrow, w, mask, cols


@launcher
@triton.jit
def _swiglu_fwd_kernel(H, W, ORDER, A, P, stride_h, stride_a, I: tl.constexpr, HAS_ORDER: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    gate, up, _, w, mask, cols = _swiglu_rows(H, W, ORDER, rows, P, stride_h, I, HAS_ORDER, BLOCK_I)
    a = gate * tl.sigmoid(gate) * up * w[:, None]
    tl.store(A + rows.to(tl.int64)[:, None] * stride_a + cols[None, :], a.to(A.dtype.element_ty), mask=mask)


@launcher
@triton.jit
def _swiglu_bwd_kernel(H, W, ORDER, GA, GH, GW, P, stride_h, stride_ga, I: tl.constexpr, HAS_ORDER: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    """a = w * silu(g) * u: dg = w da u silu'(g), du = w da silu(g), dw = sum(da silu(g) u) in one pass."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    gate, up, wrow, w, mask, cols = _swiglu_rows(H, W, ORDER, rows, P, stride_h, I, HAS_ORDER, BLOCK_I)
    r64 = rows.to(tl.int64)[:, None]
    ga = tl.load(GA + r64 * stride_ga + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    tl.store(GW + wrow, tl.sum(ga * silu * up, 1), mask=rows < P)
    gs = ga * w[:, None]
    gh = GH + r64 * (2 * I) + cols[None, :]
    tl.store(gh, (gs * up * sig * (1.0 + gate * (1.0 - sig))).to(GH.dtype.element_ty), mask=mask)
    tl.store(gh + I, (gs * silu).to(GH.dtype.element_ty), mask=mask)


def _swiglu_launch(h: torch.Tensor) -> tuple[int, dict]:
    I = h.shape[1] // 2
    block_i = triton.next_power_of_2(I)
    block_r = max(1, 4096 // block_i)
    return triton.cdiv(h.shape[0], block_r), dict(I=I, BLOCK_R=block_r, BLOCK_I=block_i, num_warps=4)


class _SwigluWeighted(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, order):
        h = last_dim_contiguous(h)
        w = w.contiguous()
        grid, meta = _swiglu_launch(h)
        a = torch.empty(h.shape[0], meta["I"], device=h.device, dtype=h.dtype)
        order_arg = order if order is not None else w
        _swiglu_fwd_kernel[(grid,)](h, w, order_arg, a, h.shape[0], h.stride(0), a.stride(0),
                                    HAS_ORDER=order is not None, **meta)
        ctx.save_for_backward(h, w, order)
        return a

    @staticmethod
    def backward(ctx, ga):
        h, w, order = ctx.saved_tensors
        ga = last_dim_contiguous(ga)
        grid, meta = _swiglu_launch(h)
        gh = torch.empty(h.shape[0], h.shape[1], device=h.device, dtype=h.dtype)
        gw = torch.empty(w.shape[0], device=h.device, dtype=torch.float32)  # every place written once
        _swiglu_bwd_kernel[(grid,)](h, w, order if order is not None else w, ga, gh, gw, h.shape[0], h.stride(0),
                                    ga.stride(0), HAS_ORDER=order is not None, **meta)
        return gh, gw.to(w.dtype), None


def swiglu_weighted(h: torch.Tensor, w: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """h [P, 2I] (gate columns, then up), w [P] -> w * silu(gate) * up [P, I] in h's dtype, fp32 math;
    with order [P] (a permutation), row r takes w[order[r]] (w in the pairs' own order). The backward is
    one kernel that also gives w's gradient (the same formulas as ops.swiglu's plain body)."""
    return _SwigluWeighted.apply(h, w, order)
