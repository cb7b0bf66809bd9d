"""Tensor and expert parallelism for inference, applied from outside the model (one process per GPU).

Layout over W = tp * ep ranks, a DeviceMesh ("ep", "tp"): rank = ep_rank * tp + tp_rank.
    * attention (main and MTP layers): each tp rank computes heads / tp query heads. Its qkv_proj rows are
      re-sliced to [its q heads; the kv heads they read (k rows); the same kv heads (v rows)]: kv_heads / tp
      kv heads each, or, where tp exceeds the kv heads (released: full layers 4, SWA 8), the one kv head its
      q heads share (kv heads replicated). Sinks go with their heads. o_proj is row-parallel (its columns
      of this rank's heads), followed by one all-reduce over the tp group (`Attention.out_reduce`).
    * dense SwiGLU (main and MTP): gate_up_proj column-parallel (this rank's gate rows, then its up rows),
      down_proj row-parallel, one all-reduce over tp (`MLP.out_reduce`).
    * routed experts: split over the ep ranks (experts [e0, e0 + E / ep)) and each expert's intermediate
      dim over the tp ranks. Routing runs replicated on every rank (same hidden states, same choice);
      `ExpertParallelInference` computes this rank's share with the LocalDispatcher's math, zero for
      the other experts, then one all-reduce of the MoE output over all W ranks.
    * embed_tokens vocab-parallel (masked lookup + all-reduce over tp); lm_head vocab-parallel (local
      logits, then all-gather along the vocabulary over tp). A vocabulary that does not split evenly is
      padded to tp * ceil(V / tp) rows (zeros), cut after the gather.
Norms and the router are replicated. Every rank ends a layer with the same hidden states (the collectives
give every rank the same sum), so control flow (EOS, speculative acceptance) agrees without messages.

The collectives run in place eagerly (NCCL's are captured by CUDA graphs) and as torch.distributed's
functional collectives under torch.compile (which traces those); nothing in a step waits for the host
except the eager prefill's expert compaction (the graphed decode steps use experts="decode", which does
not compact).

FP8 weights (quant/): the row slices above start on head boundaries; q heads (192 rows) of 8-head ranks
start on 128-row blocks, but a single kv head's k rows (192) do not. A float model loading an FP8
checkpoint reads a slice that starts inside a block through the whole block and dequantizes it
(checkpoint/slices.py), so the loaded shard is exact. An FP8-resident model (FP8Linear / FP8Experts) keeps
FP8 shards (quant.modules.shard_fp8): the release's bytes and block scales where the shard's rows/columns
fall on 128-blocks (q and v rows, intermediate shares that are multiples of 128), else the local tensor
requantized with scales of its own (k rows of an odd kv head; as vLLM does). FP8Experts gets the FP8 twin of
the expert-parallel dispatcher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..config import MiMoConfig
from ..model.attention import Attention
from ..model.layers import MLP, Linear
from ..model.moe import Experts, autocast_operands
from ..ops.linear import linear
from ..ops.moe import experts as experts_op, experts_decode
from ..options import options
from ..checkpoint.slices import Piece
from ..quant.blocks import BLOCK, SCALE_SUFFIX, scale_grid
from ..quant.gemm import fp8_experts
from ..quant.modules import FP8Experts, FP8Linear, shard_fp8


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of x over `group`. Eagerly the in-place collective (NCCL's is captured by CUDA graphs; x is always
    a fresh activation here); under torch.compile the functional one, which dynamo traces."""
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol
        return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))
    dist.all_reduce(x, group=group)
    return x


def _all_gather_last(y: torch.Tensor, group) -> torch.Tensor:
    """y [..., n] on each of the P ranks of `group` -> [..., P * n], rank order."""
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol
        gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # renamed in torch 2.11
        return funcol.wait_tensor(gather(y.contiguous(), y.dim() - 1, group))
    P = dist.get_world_size(group)
    y = y.contiguous()
    out = y.new_empty((P * y.shape[0],) + tuple(y.shape[1:]))  # ranks stacked along dim 0 (gloo's layout too)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.11
    gather(out, y, group=group)
    return out.view(P, *y.shape).movedim(0, -2).reshape(*y.shape[:-1], P * y.shape[-1])


class AllReduce(nn.Module):
    """Sum over the ranks of `group` (the partial outputs of a row-parallel projection)."""

    def __init__(self, group) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce(x, self.group)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + rows) of the embedding (weight [rows, D], the last ones padding when the
    vocabulary does not split evenly); ids elsewhere look up zeros; the all-reduce sums the ranks."""

    def __init__(self, rows: int, dim: int, start: int, vocab: int, group) -> None:
        super().__init__(rows, dim)
        self.start, self.real = start, max(0, min(rows, vocab - start))
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> [..., D]"""
        local = ids - self.start
        outside = (local < 0) | (local >= self.real)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return _all_reduce(out.masked_fill(outside[..., None], 0), self.group)


class VocabParallelHead(Linear):
    """lm_head rows [r V', (r + 1) V') (V' = ceil(V / tp), padded with zeros): local logits, then an
    all-gather along the vocabulary over the tp group; the padding columns are cut."""

    def __init__(self, dim: int, rows: int, vocab: int, group, backend: str) -> None:
        super().__init__(dim, rows, backend=backend)
        self.vocab, self.group = vocab, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., V]"""
        return _all_gather_last(linear(x, self.weight, self.backend), self.group)[..., :self.vocab]


class ExpertParallelInference:
    """The dispatcher of an Experts module that holds experts [first, first + count) of `n_experts` (and,
    under tp, a slice of each one's intermediate dim): this rank's share of every token's routed sum, with
    the LocalDispatcher's math on the local experts and zero for the others, then one all-reduce over
    `group` (all W ranks) gives every rank the whole sum."""

    def __init__(self, group, first: int, count: int, n_experts: int) -> None:
        self.group, self.first, self.count, self.n_experts = group, first, count, n_experts

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor,
                 down: torch.Tensor, backend: str) -> torch.Tensor:
        """x [N, D], idx [N, k] global expert ids, w [N, k] fp32, gate_up [El, 2Il, D], down [El, D, Il]
        -> [N, D], the sum over all ranks."""
        x, gate_up, down = autocast_operands(x, gate_up, down)
        name = options().experts if backend == "auto" else backend
        if self.count == self.n_experts:
            y = experts_op(x, idx, w, gate_up, down, backend)
        elif name == "decode":
            y = self._decode(x, idx, w, gate_up, down)
        else:
            y = self._compact(x, idx, w, gate_up, down, backend)
        return _all_reduce(y, self.group)

    def _compact(self, x, idx, w, gate_up, down, backend):
        """Eager: only the (token, slot) pairs routed here, through the module's backend (a host sync)."""
        local = idx - self.first
        tok, slot = ((local >= 0) & (local < self.count)).nonzero(as_tuple=True)
        out = torch.zeros_like(x)
        if tok.numel():
            y = experts_op(x[tok], local[tok, slot, None], w[tok, slot, None], gate_up, down, backend)
            out.index_add_(0, tok, y)
        return out

    def _decode(self, x, idx, w, gate_up, down):
        """Graph-safe (no host sync), as ops.moe.experts_decode: other ranks' experts get weight 0."""
        local = idx - self.first
        mine = (local >= 0) & (local < self.count)
        N, k = idx.shape
        if N * k * 2 <= self.count:  # each pair reads its expert (another rank's: expert 0, weight 0)
            return experts_decode(x, torch.where(mine, local, 0), torch.where(mine, w, 0.0), gate_up, down)
        h = torch.matmul(x[None], gate_up.transpose(1, 2))  # [El, N, 2Il]
        gate, up = h.chunk(2, dim=-1)
        y = torch.matmul(F.silu(gate) * up, down.transpose(1, 2))  # [El, N, D]
        wd = torch.zeros(N, self.n_experts, device=x.device, dtype=torch.float32).scatter(1, idx, w.float())
        wd = wd[:, self.first:self.first + self.count]
        return (y.float() * wd.t()[..., None]).sum(0).to(x.dtype)


class FP8ExpertParallelInference(ExpertParallelInference):
    """ExpertParallelInference for FP8Experts (fp8_experts' signature): this rank's experts computed from their
    FP8 weights and block scales, zero for the others, then the one all-reduce over `group`."""

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor,
                 gate_up_scale: torch.Tensor, down: torch.Tensor, down_scale: torch.Tensor,
                 backend: str) -> torch.Tensor:
        """x [N, D], idx [N, k] global expert ids, w [N, k], gate_up [El, 2Il, D] fp8 + scale, down [El, D, Il]
        fp8 + scale -> [N, D], the sum over all ranks."""
        weights = (gate_up, gate_up_scale, down, down_scale)
        local = idx - self.first
        mine = (local >= 0) & (local < self.count)
        if self.count == self.n_experts:
            y = fp8_experts(x, idx, w, *weights, backend)
        elif options().experts == "decode":  # graph-safe: other ranks' pairs read expert 0 with weight 0
            y = fp8_experts(x, torch.where(mine, local, 0), torch.where(mine, w, 0.0), *weights, backend)
        else:  # eager: only the pairs routed here (a host sync)
            tok, slot = mine.nonzero(as_tuple=True)
            y = torch.zeros_like(x)
            if tok.numel():
                y.index_add_(0, tok, fp8_experts(x[tok], local[tok, slot, None], w[tok, slot, None], *weights,
                                                 backend))
        return _all_reduce(y, self.group)


@dataclass
class InferencePlan:
    """What parallelize_for_inference did; held by the model as `model.parallel`."""
    tp: int
    ep: int
    tp_rank: int
    ep_rank: int
    tp_group: object
    world_group: object
    local_config: MiMoConfig  # the model's config with this rank's head counts (its KV cache's)
    shards: dict[str, list[Piece]] = field(default_factory=dict)  # our tensor name -> its local pieces


def head_split(heads: int, kv_heads: int, tp: int, rank: int, where: str) -> tuple[int, int, int, int]:
    """-> (first q head, q heads, first kv head, kv heads) of tp rank `rank`."""
    if heads % tp:
        raise ValueError(f"{where}: {heads} attention heads cannot be split over tp={tp} ranks")
    hl = heads // tp
    if tp <= kv_heads:
        if kv_heads % tp:
            raise ValueError(f"{where}: {kv_heads} kv heads cannot be split over tp={tp} ranks")
        return rank * hl, hl, rank * (kv_heads // tp), kv_heads // tp
    group = heads // kv_heads  # q heads per kv head
    if group % hl:
        raise ValueError(f"{where}: tp={tp} > {kv_heads} kv heads needs tp to be a multiple of the kv heads "
                         f"(each rank's {hl} q heads must read one kv head)")
    return rank * hl, hl, rank * hl // group, 1


def _rows(a: int, b: int, ndim: int, dim: int = 0, lead: tuple[slice, ...] = ()) -> tuple[slice, ...]:
    box = [slice(None)] * ndim
    for i, s in enumerate(lead):
        box[i] = s
    box[dim] = slice(a, b)
    return tuple(box)


def _concrete(box: tuple, shape) -> tuple[slice, ...]:
    """Leading slices (the rest: whole dims) -> one slice per dim with concrete start and stop."""
    box = tuple(box) + (slice(None),) * (len(shape) - len(box))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(box, shape, strict=True))


def _pieces(full_shape, boxes: list[tuple], dim: int) -> tuple[list[Piece], tuple[int, ...]]:
    """Full-tensor boxes, concatenated along `dim` in order -> (pieces, local shape)."""
    pieces, at = [], 0
    for box in boxes:
        full = _concrete(box, full_shape)
        n = full[dim].stop - full[dim].start
        local = tuple(slice(at, at + n) if d == dim else slice(0, s.stop - s.start) for d, s in enumerate(full))
        pieces.append(Piece(local, full))
        at += n
    shape = tuple(at if d == dim else pieces[0].local[d].stop for d in range(len(full_shape)))
    return pieces, shape


def _shard(module: nn.Module, attr: str, name: str, pieces: list[Piece], shape, plan: InferencePlan,
           pad: bool = False) -> None:
    """Replace module.attr by its local part (filled from the full tensor unless on the meta device); an FP8
    weight (FP8Linear, FP8Experts) together with its block scales (quant.modules.shard_fp8)."""
    full = getattr(module, attr)
    if isinstance(module, (FP8Linear, FP8Experts)):
        scale = getattr(module, attr + SCALE_SUFFIX)
        if full.device.type == "meta":  # the loader fills both (checkpoint/load.py)
            q = torch.empty(shape, dtype=full.dtype, device="meta")
            s = torch.empty(scale_grid(tuple(shape), BLOCK), dtype=scale.dtype, device="meta")
        else:
            with torch.no_grad():
                q, s = shard_fp8(full, scale, pieces, tuple(shape))
        setattr(module, attr, nn.Parameter(q, requires_grad=False))
        setattr(module, attr + SCALE_SUFFIX, nn.Parameter(s, requires_grad=False))
        plan.shards[name] = pieces
        return
    local = torch.empty(shape, dtype=full.dtype, device=full.device)
    if full.device.type != "meta":
        with torch.no_grad():
            if pad:
                local.zero_()
            for p in pieces:
                local[p.local] = full[p.full]
    setattr(module, attr, nn.Parameter(local, requires_grad=False))
    plan.shards[name] = pieces


def _mesh(tp: int, ep: int, mesh):
    if mesh is not None:
        return mesh
    from torch.distributed.device_mesh import init_device_mesh
    if not dist.is_initialized():
        raise RuntimeError(f"tp={tp}, ep={ep} needs torch.distributed initialised (launch with torchrun; "
                           "see distributed.init_inference)")
    if dist.get_world_size() != tp * ep:
        raise ValueError(f"tp={tp} x ep={ep} = {tp * ep} ranks, but {dist.get_world_size()} processes run")
    dev = "cuda" if "nccl" in dist.get_backend() else "cpu"
    return init_device_mesh(dev, (ep, tp), mesh_dim_names=("ep", "tp"))


def parallelize_for_inference(model, tp: int = 1, ep: int = 1, mesh=None) -> InferencePlan:
    """Keep this rank's share of `model` (a MiMoForCausalLM, materialized or on the meta device) and install
    the collectives; returns the plan (also `model.parallel`). mesh: a DeviceMesh ("ep", "tp") of shape
    (ep, tp) (default: built over the default process group, which must have tp * ep ranks)."""
    if model.parallel is not None:
        raise ValueError("the model is already parallelized")
    if tp < 1 or ep < 1:
        raise ValueError(f"tp and ep must be >= 1, got tp={tp}, ep={ep}")
    c: MiMoConfig = model.config
    if c.n_routed_experts % ep:
        raise ValueError(f"{c.n_routed_experts} routed experts cannot be split over ep={ep} ranks")
    if c.moe_intermediate_size % tp or c.intermediate_size % tp:
        raise ValueError(f"intermediate sizes ({c.intermediate_size}, experts {c.moe_intermediate_size}) "
                         f"cannot be split over tp={tp} ranks")
    mesh = _mesh(tp, ep, mesh)
    tr, er = mesh.get_local_rank("tp"), mesh.get_local_rank("ep")
    local = {}
    for swa in (False, True):
        d = c.attn_dims(swa)
        _, hl, _, kl = head_split(d["heads"], d["kv_heads"], tp, tr, "swa attention" if swa else "full attention")
        local[swa] = (hl, kl)
    local_config = c.replace(num_attention_heads=local[False][0], num_key_value_heads=local[False][1],
                             swa_num_attention_heads=local[True][0], swa_num_key_value_heads=local[True][1])
    if tp > 1 and ep > 1 and mesh.size() != dist.get_world_size():
        raise ValueError(f"the ('ep', 'tp') mesh has {mesh.size()} ranks; it must span all {dist.get_world_size()}")
    # the MoE output is summed over every rank of the mesh, which spans the default group
    world_group = mesh.get_group("tp") if ep == 1 else mesh.get_group("ep") if tp == 1 else dist.group.WORLD
    plan = InferencePlan(tp, ep, tr, er, mesh.get_group("tp"), world_group, local_config)

    for prefix, m in list(model.named_modules()):
        if isinstance(m, Attention):
            _attention(m, prefix, plan)
        elif isinstance(m, MLP):
            _mlp(m, prefix, plan)
        elif isinstance(m, (Experts, FP8Experts)):
            _experts(m, prefix, plan)
    _vocab(model, plan)
    model.parallel = plan
    return plan


def _attention(m: Attention, prefix: str, plan: InferencePlan) -> None:
    where = f"{prefix} ({'swa' if m.swa else 'full'} attention)"
    q0, hl, k0, kl = head_split(m.heads, m.kv_heads, plan.tp, plan.tp_rank, where)
    dq, dv, H, K = m.qk_dim, m.v_dim, m.heads, m.kv_heads
    w = m.qkv_proj.weight
    boxes = [_rows(q0 * dq, (q0 + hl) * dq, 2), _rows(H * dq + k0 * dq, H * dq + (k0 + kl) * dq, 2),
             _rows(H * dq + K * dq + k0 * dv, H * dq + K * dq + (k0 + kl) * dv, 2)]
    _shard(m.qkv_proj, "weight", f"{prefix}.qkv_proj.weight", *_pieces(w.shape, boxes, 0), plan)
    o = m.o_proj.weight
    _shard(m.o_proj, "weight", f"{prefix}.o_proj.weight",
           *_pieces(o.shape, [_rows(q0 * dv, (q0 + hl) * dv, 2, dim=1)], 1), plan)
    if m.attention_sink_bias is not None:
        _shard(m, "attention_sink_bias", f"{prefix}.attention_sink_bias",
               *_pieces((H,), [(slice(q0, q0 + hl),)], 0), plan)
    _local_features(m.qkv_proj)
    m.heads, m.kv_heads = hl, kl
    m.out_reduce = AllReduce(plan.tp_group)


def _mlp(m: MLP, prefix: str, plan: InferencePlan) -> None:
    I = m.intermediate
    il = I // plan.tp
    a = plan.tp_rank * il
    gu = m.gate_up_proj.weight
    _shard(m.gate_up_proj, "weight", f"{prefix}.gate_up_proj.weight",
           *_pieces(gu.shape, [_rows(a, a + il, 2), _rows(I + a, I + a + il, 2)], 0), plan)
    dn = m.down_proj.weight
    _shard(m.down_proj, "weight", f"{prefix}.down_proj.weight", *_pieces(dn.shape, [_rows(a, a + il, 2, dim=1)], 1), plan)
    _local_features(m.gate_up_proj, m.down_proj)
    m.intermediate = il
    m.out_reduce = AllReduce(plan.tp_group)


def _local_features(*mods: nn.Module) -> None:
    """A sliced projection's in/out_features (what its repr shows) from its local weight."""
    for m in mods:
        m.out_features, m.in_features = m.weight.shape


def _experts(m: Experts | FP8Experts, prefix: str, plan: InferencePlan) -> None:
    E, I2, _ = m.gate_up_proj.shape
    I, el = I2 // 2, E // plan.ep
    il = I // plan.tp
    e = slice(plan.ep_rank * el, (plan.ep_rank + 1) * el)
    a = plan.tp_rank * il
    _shard(m, "gate_up_proj", f"{prefix}.gate_up_proj",
           *_pieces(m.gate_up_proj.shape, [_rows(a, a + il, 3, 1, (e,)), _rows(I + a, I + a + il, 3, 1, (e,))], 1), plan)
    _shard(m, "down_proj", f"{prefix}.down_proj", *_pieces(m.down_proj.shape, [_rows(a, a + il, 3, 2, (e,))], 2), plan)
    parallel = FP8ExpertParallelInference if isinstance(m, FP8Experts) else ExpertParallelInference
    m.dispatcher = parallel(plan.world_group, e.start, el, E)


def _vocab(model, plan: InferencePlan) -> None:
    c = model.config
    V, D = c.vocab_size, c.hidden_size
    rows = math.ceil(V / plan.tp)
    start = plan.tp_rank * rows
    box = [(slice(min(start, V), min(start + rows, V)),)]
    with torch.device("meta"):  # the weights are set below: allocate nothing here
        emb = VocabParallelEmbedding(rows, D, start, V, plan.tp_group)
        head = VocabParallelHead(D, rows, V, plan.tp_group, model.lm_head.backend)
    emb.weight = model.model.embed_tokens.weight
    pieces, _ = _pieces((V, D), box, 0)
    _shard(emb, "weight", "model.embed_tokens.weight", pieces, (rows, D), plan, pad=True)
    model.model.embed_tokens = emb
    if c.tie_word_embeddings:
        head.weight = emb.weight
    else:
        head.weight = model.lm_head.weight
        _shard(head, "weight", "lm_head.weight", pieces, (rows, D), plan, pad=True)
    model.lm_head = head


def init_inference(tp: int = 1, ep: int = 1, device: str | None = None):
    """Join torchrun's process group for tp * ep ranks (context.init_distributed: NCCL on GPUs, gloo on CPUs)
    -> (DeviceMesh ("ep", "tp"), or None in one process; this rank's device)."""
    from .context import init_distributed
    ctx = init_distributed(device=device)
    if ctx.world != tp * ep:
        raise ValueError(f"tp={tp} x ep={ep} = {tp * ep} ranks, but {ctx.world} process(es) were launched "
                         f"(torchrun --nproc-per-node {tp * ep})")
    return (_mesh(tp, ep, None) if ctx.world > 1 else None), ctx.device


def load_parallel(path, tp: int = 1, ep: int = 1, device=None, mesh=None, **kwargs):
    """This rank's share of the checkpoint at `path` (inside a torchrun process of tp * ep): built on the
    meta device, parallelized, then only its parts read (checkpoint.load_pretrained's other arguments
    pass through). device: default this rank's GPU (or the CPU)."""
    from ..checkpoint import load_pretrained
    if mesh is None:
        mesh, dev = init_inference(tp, ep, None if device is None else str(device))
        device = device or dev
    if tp * ep == 1:
        return load_pretrained(path, device=device, **kwargs)
    return load_pretrained(path, device=device, parallelize=lambda m: parallelize_for_inference(m, tp, ep, mesh).shards,
                           **kwargs)
