"""RMSNorm and the residual add fused with it (ops/norm.py on CUDA), one kernel each way."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launcher


# ops.norm.add_rms_norm / rms_norm with the roundings of their plain bodies: h = x + y rounded to the input
# dtype; normalised in fp32, rounded, then times the weight (rounded). The backward adds the residual's own
# gradient; the weight's gradient is summed per program in fp32 (partials [programs, D], then one sum).
@launcher
@triton.jit
def _norm_fwd_kernel(X, Y, W, H, OUT, RSTD, N, eps, D: tl.constexpr, HAS_Y: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < N
    mask = rmask[:, None] & (cols < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    h = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_Y:
        h = (h.to(tl.float32) + tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + offs, h, mask=mask)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, 1) / D + eps)
    n = (hf * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (w[None, :] * n).to(OUT.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@launcher
@triton.jit
def _norm_bwd_kernel(H, W, RSTD, GOUT, GH, GX, GWP, N, D: tl.constexpr, HAS_GH: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """out = w * round(h r), r = rsqrt(mean(h^2) + eps): g_n = round(g_out w); g_h = round(g_n r - h r^3
    mean(g_n h)) (+ the residual gradient g_h, rounded); the weight's partial sum of round(g_out n)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    gw = tl.zeros([BLOCK_D], dtype=tl.float32)
    dt = GX.dtype.element_ty
    for r0 in range(0, ROWS, BLOCK_R):
        rows = pid * ROWS + r0 + tl.arange(0, BLOCK_R)
        rmask = rows < N
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        hf = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        go = tl.load(GOUT + offs, mask=mask, other=0.0).to(tl.float32)
        n = (hf * rstd[:, None]).to(dt).to(tl.float32)
        gw += tl.sum((go * n).to(dt).to(tl.float32), 0)
        gn = (go * w[None, :]).to(dt).to(tl.float32)
        dot = tl.sum(gn * hf, 1) / D
        gx = (gn * rstd[:, None] - hf * (rstd * rstd * rstd * dot)[:, None]).to(dt)
        if HAS_GH:
            gx = (gx.to(tl.float32) + tl.load(GH + offs, mask=mask, other=0.0).to(tl.float32)).to(dt)
        tl.store(GX + offs, gx, mask=mask)
    tl.store(GWP + pid * D + cols, gw, mask=cmask)


NORM_BWD = dict(ROWS=16, num_warps=4)  # rows per program of the norm's backward (one partial weight gradient each;
# bench/gpu_check.py --norm-sweep)


def _norm_blocks(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(D)
    return max(1, 4096 // block_d), block_d


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, weight, eps: float):
        shape = x.shape
        D = shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        N = x2.shape[0]
        h = torch.empty_like(x2) if y is not None else x2
        out = torch.empty(N, D, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
        rstd = torch.empty(N, device=x.device, dtype=torch.float32)
        block_r, block_d = _norm_blocks(D)
        if N:
            y2 = y.reshape(-1, D).contiguous() if y is not None else x2
            _norm_fwd_kernel[(triton.cdiv(N, block_r),)](x2, y2, weight, h, out, rstd, N, eps, D=D,
                                                         HAS_Y=y is not None, BLOCK_R=block_r, BLOCK_D=block_d,
                                                         num_warps=8)
        ctx.save_for_backward(h, weight, rstd)
        ctx.has_y, ctx.shape = y is not None, shape
        ctx.set_materialize_grads(False)
        return (h.view(shape), out.view(shape)) if y is not None else out.view(shape)

    @staticmethod
    def backward(ctx, *grads):
        gh, gout = grads if ctx.has_y else (None, grads[0])
        h, weight, rstd = ctx.saved_tensors
        N, D = h.shape
        gx = torch.empty_like(h)
        block_r, block_d = _norm_blocks(D)
        progs = triton.cdiv(N, NORM_BWD["ROWS"])
        gwp = torch.empty(progs, D, device=h.device, dtype=torch.float32)
        if gout is None:
            gout = torch.zeros(N, D, device=h.device, dtype=h.dtype)
        if N:
            gh2 = gh.reshape(N, D).contiguous() if gh is not None else h
            _norm_bwd_kernel[(progs,)](h, weight, rstd, gout.reshape(N, D).contiguous(), gh2, gx, gwp, N, D=D,
                                       HAS_GH=gh is not None, BLOCK_R=min(block_r, NORM_BWD["ROWS"]),
                                       BLOCK_D=block_d, **NORM_BWD)
        gx = gx.view(ctx.shape)
        return gx, (gx if ctx.has_y else None), gwp.sum(0).to(weight.dtype), None


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.norm.add_rms_norm: x, y [..., D] (same dtype), weight [D] -> (h = x + y, rms_norm(h) * weight),
    one kernel each way."""
    return _AddRMSNorm.apply(x, y, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ops.norm.rms_norm, one kernel each way."""
    return _AddRMSNorm.apply(x, None, weight, eps)
