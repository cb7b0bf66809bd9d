"""The banded attention ("triton" backend of ops/attention.py): sliding-window with the sink, or full causal
attention without a window; forward, dQ and dK/dV, and banded_swa_qkv, which also takes RoPE's and the value
scale's gradient. This file: what the kernels take (split_dim, supported), their tiles, and the autograd
functions that launch them; the kernels themselves, their tile helpers and the mask rule are swa_kernels.py.

banded_swa_qkv takes the q/k/v projection's output: RoPE's kernel rotates q and k and scales v, and
the backward kernels store the projection's gradient (dQ and dK unrotated, dV scaled, once per tile of
sums) in place of dQ, dK, dV and a pass of RoPE's backward kernel over them.
"""

from __future__ import annotations

import torch
import triton

from .launch import STATIC_LOOPS, last_dim_contiguous
from .rope import cos_sin, rope_qkv
from .swa_kernels import _swa_bwd_dkdv, _swa_bwd_dq, _swa_fwd

LOG2E = 1.4426950408889634


def split_dim(d: int) -> tuple[int, int] | None:
    """d -> (DA, DB), DA the largest power of two <= d and DB = d - DA a power of two or 0; None if not."""
    if d < 16:
        return None
    da = 1 << (d.bit_length() - 1)
    db = d - da
    if db and (db & (db - 1) or db < 16):
        return None
    return da, db


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Head dims the kernels take (see split_dim) and half-precision inputs."""
    dv = v.shape[-1]
    return (split_dim(q.shape[-1]) is not None and dv >= 16 and dv & (dv - 1) == 0 and dv <= 256
            and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype and v.dtype == q.dtype)


FWD_CFG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
DKDV_CFG = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1)
DQ_CFG = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1)


def _heads_view(B: int, T: int, H: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """A new [B, H, T, D] tensor stored as [B, T, H, D]: the layout the model's projections read and
    write, so that the output (and the gradients) need no transposing copy."""
    return torch.empty(B, T, H, D, device=like.device, dtype=like.dtype).transpose(1, 2)


def rope_fits(d: int, rotary_dim: int) -> bool:
    """Can the backward kernels take the gradient through RoPE over the first rotary_dim of d Q/K dims: the
    rotary dims are the whole first part of split_dim(d) or its first half (192 = 128 + 64, 64 rotary)."""
    parts = split_dim(d)
    return parts is not None and rotary_dim in (parts[0], parts[0] // 2) and rotary_dim >= 4


def _qkv_views(x: torch.Tensor, H: int, Hkv: int, D: int, Dv: int):
    """x [B, T, H * D + Hkv * (D + Dv)] -> its q [B, H, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv] (views)."""
    B, T, _ = x.shape
    q = x[..., :H * D].view(B, T, H, D).transpose(1, 2)
    k = x[..., H * D:(H + Hkv) * D].view(B, T, Hkv, D).transpose(1, 2)
    v = x[..., (H + Hkv) * D:].view(B, T, Hkv, Dv).transpose(1, 2)
    return q, k, v


class _Band:
    """The launches of the banded kernels, for both autograd functions below. rope: None, or (cos, sin, v_scale)
    with cos / sin [B or 1, T, R]: q, k, v were rotated and scaled by ops.rope.rope_qkv, and the backward
    returns the gradients before it (the projection's)."""

    def __init__(self, q, k, v, pos, seg, scale: float, window: int | None, plain: bool, rope=None):
        self.q, self.k, self.v, self.pos, self.seg = q, k, v, pos, seg
        self.scale, self.window, self.plain = scale, window, plain
        B, H, T, D = q.shape
        self.B, self.H, self.T, self.Hkv, self.Dv = B, H, T, k.shape[1], v.shape[-1]
        self.DA, self.DB = split_dim(D)
        if rope is None:
            self.cos, self.sin, self.scb, self.sct, self.v_scale = None, None, 0, 0, 1.0
        else:
            cos, sin, self.v_scale = rope
            self.cos, self.sin, self.scb = cos_sin(cos, sin)
            self.sct = self.cos.stride(1)

    def flags(self) -> dict:
        # BAND: the key tiles a query tile visits (see the module docstring); without a window, every tile up to
        # the query's, through a power of two >= T (one compiled variant per power of two)
        band = self.window if self.window is not None else 1 << max(self.T - 1, 1).bit_length()
        return dict(REP=self.H // self.Hkv, WINDOW=self.window or 0, BAND=band, PLAIN=self.plain,
                    HAS_SEG=self.seg is not None, DA=self.DA, DB=self.DB, DV=self.Dv, STATIC=STATIC_LOOPS)

    def _strides(self):
        return tuple(s for t in (self.q, self.k, self.v) for s in t.stride()[:3])

    def forward(self, sink) -> tuple[torch.Tensor, torch.Tensor]:
        q, B, H, T = self.q, self.B, self.H, self.T
        out = _heads_view(B, T, H, self.Dv, q)
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)  # base 2, sink included
        pick = lambda t: t if t is not None else lse  # noqa: E731  (an unused pointer argument)
        grid = (triton.cdiv(T, FWD_CFG["BLOCK_M"]), B * H)
        _swa_fwd[grid](q, self.k, self.v, pick(self.pos), pick(self.seg), pick(sink), out, lse, *self._strides(),
                       *out.stride()[:3], T, H, self.scale * LOG2E, HAS_SINK=sink is not None,
                       **self.flags(), **FWD_CFG)
        return out, lse

    def backward(self, dout, out, lse, sink, dq, dk, dv) -> torch.Tensor | None:
        """dq, dk, dv: [B, H(kv), T, d] outputs (any strides, last dim contiguous); sink None unless its gradient
        is wanted -> d sink [H] or None."""
        B, H, T = self.B, self.H, self.T
        dout = last_dim_contiguous(dout)
        delta = torch.empty_like(lse)  # rowsum(dout * out) [B, H, T] fp32: written by the dQ kernel
        pick = lambda t: t if t is not None else lse  # noqa: E731
        pos, seg, cos, sin = (pick(t) for t in (self.pos, self.seg, self.cos, self.sin))
        common = (*self._strides(), *dout.stride()[:3])
        flags = dict(ROPE=self.cos is not None, R=self.cos.shape[-1] if self.cos is not None else 0, **self.flags())
        tiles = triton.cdiv(T, DQ_CFG["BLOCK_M"])
        dsink = torch.empty(B * H, tiles, device=lse.device, dtype=torch.float32) if sink is not None else None
        _swa_bwd_dq[(tiles, B * H)](
            self.q, self.k, self.v, dout, out, lse, delta, pos, seg, cos, sin, dq, pick(sink), pick(dsink), *common,
            *out.stride()[:3], *dq.stride()[:3], self.scb, self.sct, T, H, self.scale * LOG2E, self.scale,
            HAS_SINK=sink is not None, **flags, **DQ_CFG)
        _swa_bwd_dkdv[(triton.cdiv(T, DKDV_CFG["BLOCK_N"]), B * self.Hkv)](
            self.q, self.k, self.v, dout, lse, delta, pos, seg, cos, sin, dk, dv, *common, *dk.stride()[:3],
            *dv.stride()[:3], self.scb, self.sct, T, self.Hkv, self.scale * LOG2E, self.scale, self.v_scale,
            **flags, **DKDV_CFG)
        return dsink.view(B, H, tiles).sum((0, 2)).to(sink.dtype) if sink is not None else None


class _BandedSWA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, pos, seg, scale: float, window: int, plain: bool):
        q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
        out, lse = _Band(q, k, v, pos, seg, scale, window, plain).forward(sink)
        ctx.save_for_backward(q, k, v, sink, pos, seg, out, lse)
        ctx.args = (scale, window, plain)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, sink, pos, seg, out, lse = ctx.saved_tensors
        band = _Band(q, k, v, pos, seg, *ctx.args)
        B, H, T, D = q.shape
        Hkv, Dv = band.Hkv, band.Dv
        dq, dk, dv = _heads_view(B, T, H, D, q), _heads_view(B, T, Hkv, D, q), _heads_view(B, T, Hkv, Dv, q)
        dsink = band.backward(dout, out, lse, sink if ctx.needs_input_grad[3] else None, dq, dk, dv)
        return dq, dk, dv, dsink, None, None, None, None, None


class _BandedSWAQKV(torch.autograd.Function):
    """RoPE (ops.rope.rope_qkv's kernel) then banded attention, with the backward through both in the attention
    kernels: they write the projection's gradient, unrotated and scaled once per tile, in place of the gradients
    of q, k and v and a RoPE kernel's pass over them."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, sink, pos, seg, heads: int, kv_heads: int, qk_dim: int, v_dim: int,
                v_scale: float, scale: float, window: int, plain: bool):
        q, k, v = (t.transpose(1, 2) for t in rope_qkv(qkv, cos, sin, heads, kv_heads, qk_dim, v_dim, v_scale))
        out, lse = _Band(q, k, v, pos, seg, scale, window, plain).forward(sink)
        ctx.save_for_backward(q, k, v, cos, sin, sink, pos, seg, out, lse)
        ctx.args = (scale, window, plain, v_scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, cos, sin, sink, pos, seg, out, lse = ctx.saved_tensors
        scale, window, plain, v_scale = ctx.args
        band = _Band(q, k, v, pos, seg, scale, window, plain, (cos, sin, v_scale))
        B, H, T, D = q.shape
        grad = torch.empty(B, T, H * D + band.Hkv * (D + band.Dv), device=q.device, dtype=q.dtype)
        dsink = band.backward(dout, out, lse, sink if ctx.needs_input_grad[3] else None,
                              *_qkv_views(grad, H, band.Hkv, D, band.Dv))
        return (grad, None, None, dsink) + (None,) * 10


def banded_swa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None,
               seg: torch.Tensor | None, scale: float, window: int | None, sink: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, T, Dqk], k [B, Hkv, T, Dqk], v [B, Hkv, T, Dv]; pos / seg [B, T] int32 or None
    (None pos = positions are the indices; None seg = one document); window None: full causal attention;
    sink [H] or None -> [B, H, T, Dv].

    Queries and keys are the same T tokens; positions must rise by at least one per token within a
    document (see the module docstring).
    """
    return _BandedSWA.apply(q, k, v, sink, pos, seg, scale, window, pos is None)


def banded_swa_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, qk_dim: int,
                   v_dim: int, v_scale: float, pos: torch.Tensor | None, seg: torch.Tensor | None, scale: float,
                   window: int | None, sink: torch.Tensor | None) -> torch.Tensor:
    """banded_swa of ops.rope.rope_qkv(qkv, cos, sin, ...)'s q, k, v, with the gradient through RoPE and the value
    scale taken in the attention kernels. qkv [B, T, heads * qk_dim + kv_heads * (qk_dim + v_dim)] (last dim
    contiguous), cos / sin [B or 1, T, R] with rope_fits(qk_dim, R); the rest as banded_swa
    -> [B, heads, T, v_dim]."""
    return _BandedSWAQKV.apply(qkv, cos, sin, sink, pos, seg, heads, kv_heads, qk_dim, v_dim, v_scale, scale,
                               window, pos is None)
