"""Cross entropy that never builds an fp32 copy of the logits.

`cross_entropy_sum(logits [N, V], targets [N])` is `F.cross_entropy(logits.float(), targets,
ignore_index=-100, reduction="sum")` computed another way:
    forward  : per row lse = logsumexp(x) and loss = lse - x[target] (0 where the target is -100), in fp32,
               reading the logits once in their own dtype; only lse [N] is kept.
    backward : d logits = (exp(x - lse) - onehot(target)) * grad, 0 on ignored rows, computed in fp32 and
               written in the logits' dtype (the same rounding as autograd's cast of the fp32 gradient).
With inplace=True the gradient is written over the logits themselves (the caller promises that nothing
else reads them: MiMoForCausalLM(return_logits=False)); then the loss costs no memory beyond the logits.

On CUDA with half-precision logits two Triton kernels do it (one row per program); elsewhere the same
formulas run in plain PyTorch over chunks of rows (fp64 logits stay fp64).
"""

from __future__ import annotations

import torch

from ..options import options
from .compiled import kernels

IGNORE = -100
CHUNK_ROWS = 4096
TRITON = True  # False: the chunked PyTorch path on CUDA too


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _triton_ok(logits: torch.Tensor) -> bool:
    return (TRITON and logits.is_cuda and logits.dtype in (torch.bfloat16, torch.float16) and options().compile
            and kernels("loss") is not None)


def _fwd_torch(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, V], t [N] -> (lse [N], loss per row [N]) in the accumulation dtype."""
    acc = _acc_dtype(x.dtype)
    lse = torch.empty(x.shape[0], device=x.device, dtype=acc)
    rows = torch.empty_like(lse)
    for s in range(0, x.shape[0], CHUNK_ROWS):
        xf = x[s:s + CHUNK_ROWS].to(acc)
        tc = t[s:s + CHUNK_ROWS]
        valid = tc != IGNORE
        l = torch.logsumexp(xf, -1)
        xt = xf.gather(1, torch.where(valid, tc, 0)[:, None])[:, 0]
        lse[s:s + CHUNK_ROWS] = l
        rows[s:s + CHUNK_ROWS] = torch.where(valid, l - xt, 0.0)
    return lse, rows


def _bwd_torch(x: torch.Tensor, t: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> None:
    """Write (softmax(x) - onehot(t)) * g (0 on ignored rows) into out [N, V] (may be x itself)."""
    acc = lse.dtype
    g = g.to(acc)
    for s in range(0, x.shape[0], CHUNK_ROWS):
        tc = t[s:s + CHUNK_ROWS]
        valid = tc != IGNORE
        p = torch.exp(x[s:s + CHUNK_ROWS].to(acc) - lse[s:s + CHUNK_ROWS, None])
        p.scatter_add_(1, torch.where(valid, tc, 0)[:, None], -valid.to(acc)[:, None])
        p *= torch.where(valid, g, 0.0)[:, None]
        out[s:s + CHUNK_ROWS] = p.to(out.dtype)


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, inplace: bool):
        if _triton_ok(logits):
            lse, rows = kernels("loss").ce_forward(logits, targets, IGNORE)
        else:
            lse, rows = _fwd_torch(logits, targets)
        ctx.save_for_backward(logits, targets, lse)
        ctx.inplace = inplace
        return rows.sum()

    @staticmethod
    def backward(ctx, g):
        logits, targets, lse = ctx.saved_tensors
        out = logits if ctx.inplace else torch.empty_like(logits)
        if _triton_ok(logits):
            kernels("loss").ce_backward(logits, targets, lse, g, out, IGNORE)
        else:
            _bwd_torch(logits, targets, lse, g, out)
        return out, None, None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Summed cross entropy of logits [..., V] against targets [...] (-100 ignored) -> scalar
    (fp32; fp64 for fp64 logits). Same value and gradient as F.cross_entropy on logits.float()
    with reduction="sum", without the fp32 copy. inplace=True: the backward overwrites `logits`
    with their gradient (use only when nothing else reads the logits afterwards)."""
    V = logits.shape[-1]
    x = logits.reshape(-1, V)
    if x.stride(-1) != 1:
        x = x.contiguous()
    t = targets.reshape(-1)
    if t.shape[0] != x.shape[0]:
        raise ValueError(f"logits have {x.shape[0]} rows, targets {t.shape[0]}")
    return _CrossEntropySum.apply(x, t, inplace and x.data_ptr() == logits.data_ptr())
