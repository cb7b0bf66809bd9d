"""Expert parallelism as a dispatcher: the routed experts of a MoE layer split over the ranks of a group,
each (token, slot) pair sent to its expert's rank and back through all-to-all, with autograd through both.

An Experts module holds its dispatcher (model.moe.LocalDispatcher by default);
distributed.training.apply_expert_parallel shards the weights and installs an AllToAllDispatcher.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..model.moe import autocast_operands
from ..ops.moe import combine, dispatch, experts, sort_by_expert
from .collectives import all_to_all


class AllToAllDispatcher:
    """Experts split over the ranks of `group`: rank r holds experts [r El, (r+1) El) of `n_experts`
    (the module's weights are DTensors sharded on dim 0 over the group; their local shards are used)."""

    def __init__(self, group, n_experts: int) -> None:
        P = dist.get_world_size(group)
        if n_experts % P:
            raise ValueError(f"{n_experts} routed experts cannot be split over {P} expert-parallel ranks")
        self.group, self.n_experts, self.ranks = group, n_experts, P

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor,
                 down: torch.Tensor, backend: str) -> torch.Tensor:
        """x [N, D], idx [N, k] global expert ids, w [N, k] fp32, gate_up [E, 2I, D] / down [E, D, I] sharded
        (local [El, 2I, D] / [El, D, I]) -> [N, D]."""
        P, El, k = self.ranks, self.n_experts // self.ranks, idx.shape[1]
        gate_up = gate_up.to_local() if hasattr(gate_up, "to_local") else gate_up
        down = down.to_local() if hasattr(down, "to_local") else down
        x, gate_up, down = autocast_operands(x, gate_up, down)  # all-to-all then moves half the bytes
        order, inv, counts, tok, _ = sort_by_expert(idx, self.n_experts)  # pairs grouped by expert = by rank
        counts = counts.long()
        recv_counts = torch.empty_like(counts)  # [P * El]: block s = pairs rank s sends to my experts
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        send = counts.view(P, El).sum(1).tolist()
        recv = recv_counts.view(P, El).sum(1).tolist()
        xr = all_to_all(dispatch(x, tok, inv, k), recv, send, self.group)  # [M, D] by (source rank, expert)
        local = torch.arange(El, device=x.device).repeat(P).repeat_interleave(recv_counts)  # [M]
        ones = torch.ones(local.shape[0], 1, device=x.device, dtype=torch.float32)
        yr = experts(xr, local[:, None], ones, gate_up, down, backend)  # [M, D]
        if yr.grad_fn is None and torch.is_grad_enabled():
            # No pair came to this rank's experts (M = 0) and the backend returned a constant. Tie it to its
            # inputs: every rank must run the backward's two all-to-alls, and the expert shards need (zero)
            # gradients for the reduce-scatter of their FSDP unit over "edp" (distributed.training.apply_fsdp).
            yr = yr + (xr.sum() + gate_up.sum() + down.sum()) * 0
        ys = all_to_all(yr, send, recv, self.group) * w.reshape(-1)[order, None]  # [N*k, D] in expert order
        return combine(ys.to(x.dtype), tok, inv, k)
