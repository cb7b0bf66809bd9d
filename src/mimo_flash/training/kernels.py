"""Triton kernels of training only: the AdamW step of training/optim.py and the sum of squares of the gradient
norm (distributed/training.py clip_grad_norm)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.kernels.launch import launcher


@launcher
@triton.jit
def _adamw_kernel(P, G, M, V, POW1, POW2, COEF, N, lr, beta1, beta2, wd, eps, HAS_COEF: tl.constexpr,
                  BLOCK: tl.constexpr):
    """One AdamW step over BLOCK elements of one tensor in fp32, written as torch's fused CUDA kernel writes it
    (the moments as fma(beta, m, fma(-beta, x, x)), IEEE square roots and quotients); POW1 / POW2: beta1 and
    beta2 to the power of the step (fp32, computed by torch.pow, as torch's kernel computes them). HAS_COEF: the
    gradient is first multiplied by COEF, with the roundings of torch._foreach_mul_ scaling it in place."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    bc1 = 1.0 - tl.load(POW1)
    bc2_sqrt = tl.sqrt_rn(1.0 - tl.load(POW2))
    step_size = tl.div_rn(lr, bc1)
    p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_COEF:  # torch._foreach_mul_(grads, coef) casts coef to the gradient's dtype first
        g = (g * tl.load(COEF).to(G.dtype.element_ty).to(tl.float32)).to(G.dtype.element_ty).to(tl.float32)
    m = tl.load(M + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.fma(-(lr * wd), p, p)
    m = tl.fma(beta1, m, tl.fma(-beta1, g, g))
    gg = g * g
    v = tl.fma(beta2, v, tl.fma(-beta2, gg, gg))
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=mask)
    tl.store(M + offs, m.to(M.dtype.element_ty), mask=mask)
    tl.store(V + offs, v.to(V.dtype.element_ty), mask=mask)


ADAMW_BLOCK = 4096


def adamw_step(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, pow1: torch.Tensor,
               pow2: torch.Tensor, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
               coef: torch.Tensor | None = None) -> None:
    """AdamW on one contiguous CUDA tensor in place (p, m, v updated; g read) in fp32 arithmetic, the
    hyper-parameters rounded to fp32; pow1 / pow2: 1-element fp32 device tensors, beta1 and beta2 to the power of
    this step's count; coef: a 1-element fp32 device tensor the gradient is scaled by (g itself is not written)."""
    n = p.numel()
    if n:
        _adamw_kernel[(triton.cdiv(n, ADAMW_BLOCK),)](p, g, m, v, pow1, pow2, coef if coef is not None else pow1, n,
                                                      float(lr), float(beta1), float(beta2), float(weight_decay),
                                                      float(eps), HAS_COEF=coef is not None, BLOCK=ADAMW_BLOCK,
                                                      num_warps=8)


# ----------------------------------------------------------------------------------------- sum of squares
@launcher
@triton.jit
def _sq_sum_kernel(X, OUT, N, out_offset, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """OUT[out_offset + program] = the fp32 sum of x^2 over the program's CHUNK elements of X."""
    base = tl.program_id(0).to(tl.int64) * CHUNK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        offs = base + i + tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < N, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(OUT + out_offset + tl.program_id(0), tl.sum(acc, 0))


SQ_BLOCK, SQ_CHUNK = 8192, 8192  # one block per program: 17% faster than 64k-element chunks (H100)


def sq_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The sum of squares of every element of contiguous CUDA tensors (a 0-dim fp32 tensor): one pass at copy
    speed, fp32 sums per chunk of SQ_CHUNK elements, then one sum of the chunks (the same order every time)."""
    chunks = [triton.cdiv(t.numel(), SQ_CHUNK) for t in tensors]
    part = torch.empty(sum(chunks), device=tensors[0].device, dtype=torch.float32)
    offset = 0
    for t, c in zip(tensors, chunks):
        if c:
            _sq_sum_kernel[(c,)](t, part, t.numel(), offset, BLOCK=SQ_BLOCK, CHUNK=SQ_CHUNK, num_warps=8)
        offset += c
    return part.sum()
