"""Cross entropy over rows of logits (ops/loss.py on CUDA): the log-sum-exp and loss per row, and the logits'
gradient (optionally written over the logits)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launcher


@launcher
@triton.jit
def _ce_fwd_kernel(X, TGT, LSE, LOSS, stride_x, V: tl.constexpr, IGNORE: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row per program: lse = logsumexp(x) in fp32 (online over blocks of the row), loss = lse - x[t]."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    offs = tl.arange(0, BLOCK_V)
    x = tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    m = tl.max(x, 0)
    s = tl.sum(tl.exp(x - m), 0)
    for v0 in range(BLOCK_V, V, BLOCK_V):
        o = v0 + offs
        x = tl.load(x_row + o, mask=o < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    t = tl.load(TGT + row)
    valid = t != IGNORE
    xt = tl.load(x_row + tl.where(valid, t, 0)).to(tl.float32)
    tl.store(LSE + row, lse)
    tl.store(LOSS + row, tl.where(valid, lse - xt, 0.0))


@launcher
@triton.jit
def _ce_bwd_kernel(X, TGT, LSE, SCALE, G, stride_x, stride_g, V: tl.constexpr, IGNORE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Program (row, block): g = (exp(x - lse) - [col == t]) * scale, 0 on ignored rows; G may be X."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    t = tl.load(TGT + row)
    scale = tl.load(SCALE).to(tl.float32)
    scale = tl.where(t != IGNORE, scale, 0.0)
    lse = tl.load(LSE + row)
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.exp(x - lse)
    g = (tl.where(offs == t, p - 1.0, p)) * scale
    tl.store(G + row * stride_g + offs, g.to(G.dtype.element_ty), mask=mask)


CE_FWD_BLOCK = 4096
CE_BWD_BLOCK = 4096


def ce_forward(x: torch.Tensor, t: torch.Tensor, ignore: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, V] (last dim contiguous), t [N] -> (lse [N] fp32, loss per row [N] fp32)."""
    N, V = x.shape
    lse = torch.empty(N, device=x.device, dtype=torch.float32)
    rows = torch.empty_like(lse)
    if N:
        block = min(CE_FWD_BLOCK, triton.next_power_of_2(V))
        _ce_fwd_kernel[(N,)](x, t, lse, rows, x.stride(0), V=V, IGNORE=ignore, BLOCK_V=block,
                             num_warps=8 if block >= 2048 else 4)
    return lse, rows


def ce_backward(x: torch.Tensor, t: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, out: torch.Tensor,
                ignore: int) -> None:
    """Write (softmax(x) - onehot(t)) * g into out [N, V] (may be x); g is a 0-dim device tensor."""
    N, V = x.shape
    if N:
        block = min(CE_BWD_BLOCK, triton.next_power_of_2(V))
        _ce_bwd_kernel[(N, triton.cdiv(V, block))](x, t, lse, g.float().reshape(1), out, x.stride(0),
                                                   out.stride(0), V=V, IGNORE=ignore, BLOCK_V=block,
                                                   num_warps=8 if block >= 2048 else 4)
