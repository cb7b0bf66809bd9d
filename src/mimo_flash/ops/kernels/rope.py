"""RoPE of q / k / v from one projection's output (ops/rope.py rope_qkv on CUDA): the forward in one pass, and the
gradient of the projection's output from the gradients of q, k and v in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import last_dim_contiguous, launcher


@triton.jit
def _rope_part(G, sgb, sgt, sgh, b, t, COS, SIN, cs_row, OUT, out_col, scale,
               H: tl.constexpr, D: tl.constexpr, R: tl.constexpr, HB: tl.constexpr, DB: tl.constexpr,
               FWD: tl.constexpr):
    """One token's heads [H, D] of G (strides sgb, sgt, sgh) -> OUT[out_col + h * D + d], times `scale`: the
    NeoX rotation over dims < R (pairs j, j + R/2) when FWD, else its transpose (the gradient); dims >= R
    pass through. fp32 math, one rounding. HB heads at a time."""
    d = tl.arange(0, DB)[None, :]
    rot = d < R
    half = R // 2
    partner = tl.where(d < half, d + half, d - half)
    if R > 0:
        c = tl.load(COS + cs_row + d, mask=rot, other=1.0).to(tl.float32)
        # forward: x_d cos_d + (-x_{d+h} | x_{d-h}) sin_d; transpose: g_d cos_d + (g_{d+h} | -g_{d-h}) sin_partner
        if FWD:
            sn = tl.load(SIN + cs_row + d, mask=rot, other=0.0).to(tl.float32)
            sn = tl.where(d < half, -sn, sn)
        else:
            sn = tl.load(SIN + cs_row + partner, mask=rot, other=0.0).to(tl.float32)
            sn = tl.where(d < half, sn, -sn)
    for h0 in tl.static_range(0, H, HB):
        h = h0 + tl.arange(0, HB)[:, None]
        m = (h < H) & (d < D)
        base = G + b * sgb + t * sgt + h * sgh
        g = tl.load(base + d, mask=m, other=0.0).to(tl.float32)
        out = g
        if R > 0:
            gp = tl.load(base + partner, mask=m & rot, other=0.0).to(tl.float32)
            out = tl.where(rot, g * c + gp * sn, g)
        tl.store(OUT + out_col + h * D + d, (out * scale).to(OUT.dtype.element_ty), mask=m)


@launcher
@triton.jit
def _rope_qkv_kernel(QKV, COS, SIN, Q, K, V, T, v_scale, sxb, sxt, scb, sct,
                     H: tl.constexpr, HKV: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, R: tl.constexpr,
                     HQB: tl.constexpr, HKB: tl.constexpr, DQB: tl.constexpr, DVB: tl.constexpr):
    row = tl.program_id(0)
    b = row // T
    t = row % T
    r64 = row.to(tl.int64)
    cs = b * scb + t * sct
    _rope_part(QKV, sxb, sxt, DQK, b, t, COS, SIN, cs, Q + r64 * (H * DQK), 0, 1.0, H, DQK, R, HQB, DQB, True)
    _rope_part(QKV + H * DQK, sxb, sxt, DQK, b, t, COS, SIN, cs, K + r64 * (HKV * DQK), 0, 1.0, HKV, DQK, R, HKB,
               DQB, True)
    _rope_part(QKV + (H + HKV) * DQK, sxb, sxt, DV, b, t, COS, SIN, cs, V + r64 * (HKV * DV), 0, v_scale, HKV, DV,
               0, HKB, DVB, True)


@launcher
@triton.jit
def _rope_qkv_grad_kernel(GQ, GK, GV, COS, SIN, OUT, T, v_scale,
                          sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, scb, sct,
                          H: tl.constexpr, HKV: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                          R: tl.constexpr, HQB: tl.constexpr, HKB: tl.constexpr, DQB: tl.constexpr,
                          DVB: tl.constexpr):
    row = tl.program_id(0)
    b = row // T
    t = row % T
    out_row = OUT + row.to(tl.int64) * (H * DQK + HKV * (DQK + DV))
    cs = b * scb + t * sct
    _rope_part(GQ, sqb, sqt, sqh, b, t, COS, SIN, cs, out_row, 0, 1.0, H, DQK, R, HQB, DQB, False)
    _rope_part(GK, skb, skt, skh, b, t, COS, SIN, cs, out_row, H * DQK, 1.0, HKV, DQK, R, HKB, DQB, False)
    _rope_part(GV, svb, svt, svh, b, t, COS, SIN, cs, out_row, (H + HKV) * DQK, v_scale, HKV, DV, 0, HKB, DVB, False)


ROPE_BLOCK = 4096  # elements of one block of heads in the RoPE kernels


def _rope_heads(n: int, d: int) -> int:
    """Heads per block of at most ROPE_BLOCK elements."""
    p2 = triton.next_power_of_2
    return min(p2(n), max(1, ROPE_BLOCK // p2(d)))


def cos_sin(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, cos.stride(0) if cos.shape[0] > 1 else 0


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, qk_dim: int,
             v_dim: int, v_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ops.rope.rope_qkv's forward in one pass: qkv [B, T, n] (last dim contiguous) -> q [B, T, H, Dqk],
    k [B, T, Hkv, Dqk] rotated, v [B, T, Hkv, Dv] * v_scale (fp32 math, one rounding)."""
    qkv = last_dim_contiguous(qkv)
    B, T, _ = qkv.shape
    H, Hkv, D, Dv, R = heads, kv_heads, qk_dim, v_dim, cos.shape[-1]
    q = torch.empty(B, T, H, D, device=qkv.device, dtype=qkv.dtype)
    k = torch.empty(B, T, Hkv, D, device=qkv.device, dtype=qkv.dtype)
    v = torch.empty(B, T, Hkv, Dv, device=qkv.device, dtype=qkv.dtype)
    cos, sin, scb = cos_sin(cos, sin)
    p2 = triton.next_power_of_2
    if B * T:
        _rope_qkv_kernel[(B * T,)](qkv, cos, sin, q, k, v, T, v_scale, qkv.stride(0), qkv.stride(1), scb,
                                   cos.stride(1), H=H, HKV=Hkv, DQK=D, DV=Dv, R=R, HQB=_rope_heads(H, D),
                                   HKB=_rope_heads(Hkv, max(D, Dv)), DQB=p2(D), DVB=p2(Dv), num_warps=8)
    return q, k, v


def rope_qkv_grad(gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  v_scale: float) -> torch.Tensor:
    """The gradient of ops.rope.rope_qkv's input: gq [B, T, H, Dqk], gk [B, T, Hkv, Dqk], gv [B, T, Hkv, Dv]
    (any strides, last dim contiguous), cos / sin [B or 1, T, R] -> [B, T, H * Dqk + Hkv * (Dqk + Dv)]."""
    B, T, H, D = gq.shape
    Hkv, Dv, R = gk.shape[2], gv.shape[3], cos.shape[-1]
    out = torch.empty(B, T, H * D + Hkv * (D + Dv), device=gq.device, dtype=gq.dtype)
    gq, gk, gv = (last_dim_contiguous(x) for x in (gq, gk, gv))
    cos, sin, scb = cos_sin(cos, sin)
    p2 = triton.next_power_of_2
    if B * T:
        _rope_qkv_grad_kernel[(B * T,)](gq, gk, gv, cos, sin, out, T, v_scale,
                                        gq.stride(0), gq.stride(1), gq.stride(2), gk.stride(0), gk.stride(1),
                                        gk.stride(2), gv.stride(0), gv.stride(1), gv.stride(2), scb, cos.stride(1),
                                        H=H, HKV=Hkv, DQK=D, DV=Dv, R=R, HQB=_rope_heads(H, D),
                                        HKB=_rope_heads(Hkv, max(D, Dv)), DQB=p2(D), DVB=p2(Dv), num_warps=8)
    return out
