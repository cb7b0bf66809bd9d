"""Collectives with autograd, shared by the expert dispatcher (experts.py) and context parallelism
(context_parallel.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 with uneven splits; the backward sends gradients back the same way."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """x [sum(in_splits), ...] rows grouped by destination rank (in_splits[r] rows for rank r) ->
    [sum(out_splits), ...] grouped by source rank; differentiable (the backward is the reverse all-to-all)."""
    return _AllToAll.apply(x, out_splits, in_splits, group)
