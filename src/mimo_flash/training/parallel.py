"""Distributed training on torch.distributed alone: FSDP2 plus expert parallelism.

Layout over W ranks with expert-parallel size P (P divides W):
    * every rank reads different rows (data parallel over all W ranks);
    * parameters other than the routed experts are sharded over all W ranks with FSDP2
      (`torch.distributed.fsdp.fully_shard`, one unit per decoder / MTP layer plus the root);
    * with P > 1 the routed experts of every MoE layer are split over the P ranks of an "ep" mesh
      dimension (rank r holds experts [r E/P, (r+1) E/P) as a DTensor sharded on dim 0); tokens go
      to the rank of their expert and come back through all-to-all, with autograd through both;
      with W / P > 1 copies of each expert shard, their gradients are summed over the "edp" dimension.

Gradients are sums: the trainer scales each rank's loss by 1 / (global target count), so the sum
of all ranks' gradients is the gradient of the global mean loss. FSDP averages over ranks, so its
gradients are multiplied back by W (`finish_gradients`); expert gradients arrive summed through
the all-to-all backward.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from ..model.moe import Experts
from ..ops.compiled import kernels
from ..ops.moe import experts as experts_op


@dataclass
class ParallelContext:
    """Where this process stands. Single-process training uses the default (world 1)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    ep: int = 1
    mesh: object = None  # DeviceMesh over all ranks (FSDP)
    ep_mesh: object = None  # 2-D DeviceMesh ("edp", "ep")

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_group(self):
        return self.ep_mesh.get_group("ep") if self.ep_mesh is not None else None

    @property
    def edp_group(self):
        return self.ep_mesh.get_group("edp") if self.ep_mesh is not None and self.world // self.ep > 1 else None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over all ranks, in place."""
        if self.distributed:
            dist.all_reduce(t)
        return t


def init_distributed(ep: int = 1, device: str | None = None) -> ParallelContext:
    """Join the process group torchrun (or the caller) set up through RANK / WORLD_SIZE / MASTER_ADDR.

    Without WORLD_SIZE > 1 this is single-process training on `device` (default: cuda if present).
    NCCL on GPUs (one per local rank), gloo on CPUs.
    """
    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if ep != 1:
            raise ValueError(f"expert parallelism (ep={ep}) needs several processes; launch with torchrun")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return ParallelContext(device=dev)
    if ep < 1 or world % ep:
        raise ValueError(f"ep={ep} must divide the number of processes ({world})")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=10),
                                **({"device_id": dev} if use_cuda else {}))
    mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    ep_mesh = init_device_mesh(dev.type, (world // ep, ep), mesh_dim_names=("edp", "ep")) if ep > 1 else None
    return ParallelContext(rank=rank, world=world, device=dev, ep=ep, mesh=mesh, ep_mesh=ep_mesh)


# ----------------------------------------------------------------------------- expert parallelism
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
    """x [sum(in_splits), ...] -> [sum(out_splits), ...]; differentiable."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def expert_parallel_ffn(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor,
                        down: torch.Tensor, n_experts: int, group, backend: str = "auto") -> torch.Tensor:
    """Routed experts split over the ranks of `group`: rank r holds experts [r El, (r+1) El).

    x [N, D], idx [N, k] global expert ids, w [N, k] fp32, gate_up [El, 2I, D], down [El, D, I] -> [N, D].
    Every (token, slot) pair travels to its expert's rank, is computed there, and comes back.
    """
    P = dist.get_world_size(group)
    N, k = idx.shape
    El = n_experts // P
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert, hence by destination rank
    counts = torch.bincount(flat, minlength=n_experts)  # [E] pairs per expert, sent by this rank
    recv_counts = torch.empty_like(counts)  # [P * El]: block s = pairs rank s sends to my experts
    dist.all_to_all_single(recv_counts, counts, group=group)
    send = counts.view(P, El).sum(1).tolist()
    recv = recv_counts.view(P, El).sum(1).tolist()
    tok = order // k
    xr = all_to_all(x[tok], recv, send, group)  # [M, D], ordered by (source rank, local expert)
    local = torch.arange(El, device=x.device).repeat(P).repeat_interleave(recv_counts)  # [M]
    ones = torch.ones(local.shape[0], 1, device=x.device, dtype=torch.float32)
    yr = experts_op(xr, local[:, None], ones, gate_up, down, backend)  # [M, D]
    ys = all_to_all(yr, send, recv, group) * w.reshape(-1)[order, None]  # [N*k, D], in `order`
    return torch.zeros_like(x).index_add_(0, tok, ys.to(x.dtype))


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else None


def _experts_forward(module: Experts):
    """The training forward of an Experts module: under autocast the activations and weights go in
    autocast's dtype (so grouped GEMMs apply and all-to-all moves half the bytes); with expert
    parallelism the tokens are dispatched to the experts' ranks."""

    def forward(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        gate_up, down = module.gate_up_proj, module.down_proj
        ep_group = getattr(module, "ep_group", None)
        if ep_group is not None:
            gate_up, down = gate_up.to_local(), down.to_local()
        dt = _autocast_dtype(x)
        if dt is not None:
            x, gate_up, down = x.to(dt), gate_up.to(dt), down.to(dt)
        if ep_group is None:
            return experts_op(x, idx, w, gate_up, down, module.backend)
        return expert_parallel_ffn(x, idx, w, gate_up, down, module.n_experts, ep_group, module.backend)

    return forward


def prepare_moe(model: nn.Module, ctx: ParallelContext) -> list[nn.Parameter]:
    """Install the training forward of the experts; shard them when ctx.ep > 1.

    Returns the expert parameters that live on the ep mesh (empty without expert parallelism).
    """
    from torch.distributed.tensor import DTensor, Shard

    expert_params: list[nn.Parameter] = []
    for m in model.modules():
        if not isinstance(m, Experts):
            continue
        m.n_experts = m.gate_up_proj.shape[0]
        if ctx.ep > 1:
            if m.n_experts % ctx.ep:
                raise ValueError(f"{m.n_experts} routed experts cannot be split over ep={ctx.ep} ranks")
            r = ctx.ep_mesh.get_local_rank("ep")
            El = m.n_experts // ctx.ep
            for name in ("gate_up_proj", "down_proj"):
                full = getattr(m, name).detach()
                shard = full[r * El:(r + 1) * El].to(ctx.device).clone()
                p = nn.Parameter(DTensor.from_local(shard, ctx.ep_mesh["ep"], [Shard(0)], run_check=False))
                setattr(m, name, p)
                expert_params.append(p)
            m.ep_group = ctx.ep_group
        m.forward = _experts_forward(m)
    return expert_params


# ----------------------------------------------------------------------------- FSDP2 and checkpointing
def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder and MTP layer in the backward instead of keeping its activations."""
    from torch.utils.checkpoint import checkpoint

    for layer in list(model.model.layers) + list(model.model.mtp.layers):
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def apply_fsdp(model: nn.Module, ctx: ParallelContext, ignored: list[nn.Parameter]) -> None:
    """fully_shard each decoder layer, each MTP layer, then the root (embedding, norm, lm_head).
    Expert-parallel parameters (`ignored`) stay out of FSDP."""
    from torch.distributed.fsdp import fully_shard

    ign = set(ignored) or None
    for layer in model.model.mtp.layers:
        # the model applies final_layernorm outside the MTP layer's own call: give it its own unit
        fully_shard(layer.final_layernorm, mesh=ctx.mesh, ignored_params=ign)
    for layer in list(model.model.layers) + list(model.model.mtp.layers):
        fully_shard(layer, mesh=ctx.mesh, ignored_params=ign)
    fully_shard(model, mesh=ctx.mesh, ignored_params=ign)


def parallelize(model: nn.Module, ctx: ParallelContext, activation_checkpointing: bool = False) -> list[nn.Parameter]:
    """Make `model` (on ctx.device) ready for training under ctx. Returns the expert-parallel parameters."""
    expert_params = prepare_moe(model, ctx)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if ctx.distributed:
        apply_fsdp(model, ctx, expert_params)
    return expert_params


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP: skip the reduce-scatter on all but the last micro-batch of a step."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def finish_gradients(params: list[nn.Parameter], expert_params: list[nn.Parameter], ctx: ParallelContext) -> None:
    """Turn every gradient into the sum over ranks (see the module docstring)."""
    if not ctx.distributed:
        return
    is_expert = {id(p) for p in expert_params}
    edp = ctx.edp_group
    for p in params:
        if p.grad is None:
            continue
        if id(p) in is_expert:
            if edp is not None:
                dist.all_reduce(_local(p.grad), group=edp)
        else:
            _local(p.grad).mul_(ctx.world)


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor that scales gradients of global norm `norm` down to max_norm (1 when below)."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, expert_params: list[nn.Parameter],
                   ctx: ParallelContext) -> torch.Tensor:
    """Global gradient L2 norm over all ranks' shards (an fp32 scalar tensor on the device); scales the
    gradients down to max_norm when above.

    Every element of every gradient lives on exactly one rank (FSDP shards, expert shards), except
    expert shards copied over `edp` ranks, which count once. max_norm <= 0 only measures.
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros((), dtype=torch.float32, device=ctx.device)
    copies = ctx.world // ctx.ep if ctx.ep > 1 else 1
    is_expert = {id(p) for p in expert_params}
    grads = [_local(p.grad) for p in with_grad]
    tk = kernels("mimo_flash.training.kernels")
    if tk is not None and ctx.world == 1 and all(g.is_cuda and g.is_contiguous() for g in grads):
        sq = tk.sq_sum(grads)  # one pass at copy speed (torch._foreach_norm: one reduction per tensor)
    else:
        norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))  # fp32 sums, no fp32 copies
        if copies > 1:
            norms = norms / torch.tensor([copies ** 0.5 if id(p) in is_expert else 1.0 for p in with_grad],
                                         device=norms.device)
        sq = norms.square().sum()
    ctx.all_reduce_(sq)
    norm = sq.sqrt()
    if max_norm > 0:
        torch._foreach_mul_(grads, clip_coefficient(norm, max_norm))
    return norm


# ----------------------------------------------------------------------------- full state dicts
def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (gathers a DTensor: collective, every rank must call)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu()


def load_full_(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into `target`, keeping only this rank's shard of a DTensor (collective)."""
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        part = distribute_tensor(full.to(target.to_local().device, target.dtype), target.device_mesh,
                                 target.placements)
        target.to_local().copy_(part.to_local())
    else:
        target.copy_(full.to(target.device, target.dtype))
