"""Distributed training on torch.distributed alone: FSDP2 plus expert parallelism, applied from outside.

Layout over W ranks with expert-parallel size P (P divides W):
    * every rank reads different rows (data parallel over all W ranks);
    * parameters other than the routed experts are sharded over all W ranks with FSDP2
      (`torch.distributed.fsdp.fully_shard`, one unit per decoder / MTP layer plus the root);
    * with P > 1 the routed experts of every MoE layer are split over the P ranks of an "ep" mesh
      dimension (ctx.ep_mesh, shape (W / P, P), dims ("edp", "ep"): rank r of "ep" holds experts
      [r E/P, (r+1) E/P) as a DTensor sharded on dim 0) and the Experts module gets an AllToAllDispatcher
      (distributed/experts.py);
    * with W / P > 1 each Experts module is also an FSDP2 unit over the "edp" dimension (FSDP2's 2-D
      composition with a DTensor parameter of a sibling mesh dimension, as with tensor parallelism): each
      of the W / P ranks of an "edp" group keeps 1 / (W / P) of the experts' shard, so every rank holds
      E / W experts' rows [r E/P + d E/W, r E/P + (d+1) E/W) (d its "edp" coordinate) and their AdamW
      state. FSDP all-gathers the shard over "edp" before Experts' forward (the dispatcher reads it whole)
      and frees it after.
Activation checkpointing wraps each decoder and MTP layer in torch's checkpoint wrapper.

Gradients are sums: the trainer scales each rank's loss by 1 / (global target count), so the sum
of all ranks' gradients is the gradient of the global mean loss. FSDP averages over ranks, so its
gradients are multiplied back by W (`finish_gradients`). An expert shard's gradient arrives summed
over its "ep" group through the all-to-all backward; the "edp" unit's reduce-scatter averages it over
W / P ranks, so it is multiplied back by W / P.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..model.moe import Experts
from ..ops.compiled import kernels
from .context import ParallelContext
from .experts import AllToAllDispatcher


def apply_expert_parallel(model: nn.Module, ctx: ParallelContext) -> list[nn.Parameter]:
    """Shard every Experts module's weights over ctx's "ep" mesh dimension and give it an
    AllToAllDispatcher. Returns the expert parameters that now live on the ep mesh (empty when ctx.ep == 1)."""
    if ctx.ep == 1:
        return []
    from torch.distributed.tensor import DTensor, Shard

    expert_params: list[nn.Parameter] = []
    r = ctx.ep_mesh.get_local_rank("ep")
    edp = ctx.world // ctx.ep
    for m in model.modules():
        if not isinstance(m, Experts):
            continue
        E = m.gate_up_proj.shape[0]
        m.dispatcher = AllToAllDispatcher(ctx.ep_group, E)  # checks that ctx.ep divides E
        El = E // ctx.ep
        if El % edp:
            raise ValueError(f"{El} experts per expert-parallel rank cannot be split over the {edp} ranks of "
                             f"their edp group (n_routed_experts={E}, ep={ctx.ep}, world={ctx.world})")
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(m, name).detach()
            if full.is_meta:  # built on the meta device: materialize.py fills the shard later
                shard = torch.empty((El,) + tuple(full.shape[1:]), dtype=full.dtype, device="meta")
            else:
                shard = full[r * El:(r + 1) * El].to(ctx.device).clone()
            p = nn.Parameter(DTensor.from_local(shard, ctx.ep_mesh["ep"], [Shard(0)], run_check=False))
            setattr(m, name, p)
            expert_params.append(p)
    return expert_params


def _layers(model: nn.Module) -> list[tuple[nn.ModuleList, int]]:
    """(list, index) of every decoder and MTP layer."""
    return ([(model.model.layers, i) for i in range(len(model.model.layers))]
            + [(model.model.mtp.layers, i) for i in range(len(model.model.mtp.layers))])


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder and MTP layer in the backward instead of keeping its activations: each layer
    is replaced in its ModuleList by torch's checkpoint wrapper around it (non-reentrant). The wrapper
    forwards attribute reads to the layer and its state dict keeps the layer's own names."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for layers, i in _layers(model):
        layers[i] = checkpoint_wrapper(layers[i])


def _expert_modules(model: nn.Module) -> list[Experts]:
    return [m for m in model.modules() if isinstance(m, Experts)]


def apply_fsdp(model: nn.Module, ctx: ParallelContext, ignored: list[nn.Parameter]) -> None:
    """fully_shard every part that a loss path calls directly: the embedding, the LM head, each MTP layer's
    final_layernorm (the model applies it outside the layer's own call), each decoder and MTP layer, the
    decoder stack (model.model: its final norm), then the root. The context-parallel loss
    (context_parallel.cp_head_sums) calls model.model, lm_head and mtp_step without the root's forward.

    Expert-parallel parameters (`ignored`, DTensors on ctx.ep_mesh["ep"]): with W / P > 1 each Experts module
    is first a unit of its own over ctx.ep_mesh["edp"] (the enclosing layer's unit then leaves its parameters
    alone); with W == P they stay out of FSDP (each rank holds its shard whole)."""
    from torch.distributed.fsdp import fully_shard

    ign = None
    if ignored and ctx.edp_group is not None:
        for m in _expert_modules(model):
            fully_shard(m, mesh=ctx.ep_mesh["edp"])
    elif ignored:
        ign = set(ignored)
    units = [model.model.embed_tokens] + ([model.lm_head] if not model.config.tie_word_embeddings else [])
    units += [layer.final_layernorm for layer in model.model.mtp.layers]
    units += [layers[i] for layers, i in _layers(model)] + [model.model, model]
    for unit in units:
        fully_shard(unit, mesh=ctx.mesh, ignored_params=ign)


def parallelize_for_training(model: nn.Module, ctx: ParallelContext,
                             activation_checkpointing: bool = False) -> list[nn.Parameter]:
    """Make `model` (on ctx.device) ready for training under ctx: expert parallelism, activation
    checkpointing, FSDP2, in that order. Returns the expert-parallel parameters (as the model now holds them:
    FSDP replaces the parameters it shards)."""
    expert_params = apply_expert_parallel(model, ctx)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if ctx.distributed:
        apply_fsdp(model, ctx, expert_params)
    if not expert_params:
        return []
    return [p for m in _expert_modules(model) for p in (m.gate_up_proj, m.down_proj)]


def parameter_name(name: str) -> str:
    """A parameter's name without the checkpoint wrapper's prefix: the same with or without activation
    checkpointing (optimizer checkpoints key their state by it)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

    return name.replace(_CHECKPOINT_PREFIX, "")


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP: skip the reduce-scatter on all but the last micro-batch of a step."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def finish_gradients(params: list[nn.Parameter], expert_params: list[nn.Parameter], ctx: ParallelContext) -> None:
    """Turn every gradient into the sum over ranks (see the module docstring): FSDP's average over its mesh
    times the mesh's size (W; W / P for the experts' "edp" units); expert shards held whole (W == P) are
    already sums."""
    if not ctx.distributed:
        return
    is_expert = {id(p) for p in expert_params}
    edp = ctx.world // ctx.ep
    for p in params:
        if p.grad is None:
            continue
        if id(p) not in is_expert:
            _local(p.grad).mul_(ctx.world)
        elif edp > 1:
            _local(p.grad).mul_(edp)


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor that scales gradients of global norm `norm` down to max_norm (1 when below)."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, ctx: ParallelContext) -> torch.Tensor:
    """Global gradient L2 norm over all ranks' shards (an fp32 scalar tensor on the device); scales the
    gradients down to max_norm when above.

    Every element of every gradient lives on exactly one rank (FSDP's shards over all ranks, the experts'
    over "ep" x "edp"), so the squares of the local shards sum to the global norm. max_norm <= 0 only measures.
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros((), dtype=torch.float32, device=ctx.device)
    grads = [_local(p.grad) for p in with_grad]
    tk = kernels("mimo_flash.training.kernels")
    if tk is not None and ctx.world == 1 and all(g.is_cuda and g.is_contiguous() for g in grads):
        sq = tk.sq_sum(grads)  # one pass at copy speed (torch._foreach_norm: one reduction per tensor)
    else:
        norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))  # fp32 sums, no fp32 copies
        sq = norms.square().sum()
    ctx.all_reduce_(sq)
    norm = sq.sqrt()
    if max_norm > 0:
        torch._foreach_mul_(grads, clip_coefficient(norm, max_norm))
    return norm
