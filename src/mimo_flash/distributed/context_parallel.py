"""Context parallelism: one sequence split over the N ranks of a CP group, attention exact.

Layout ("zigzag", balanced for causal attention): the sequence of T tokens is cut into 2N chunks of
C = T / (2N) tokens; rank r holds chunks r and 2N-1-r, in that order ([B, 2C] locally), so every rank
gets the same amount of causal attention work. Everything indexed by token (ids, positions, segments,
targets) is sharded with the same permutation (`shard`), before the model runs.

Attention (installed on the Attention modules by `apply_context_parallel`; the module calls
`ContextParallelAttention.attention` in place of ops.attention.attention when it is set):
  - SWA layers: query t sees keys t-W+1..t, so a chunk needs only the W-1 keys/values before it (its
    halo), which other ranks (or itself) hold. One all-to-all moves exactly those rows; the backward
    sends their gradients back to the owners. Each chunk is then attended as [halo + chunk] with the
    halo's queries set to zero and their outputs dropped, so keys and queries stay aligned (key j is
    token j) and the banded kernels apply.
  - full layers: all-gather K/V (the backward reduce-scatters their gradients) and attend the local
    queries to every key.
Masks come from positions and segments (ops/attention.py), which travel with the keys, so sinks, packed
documents and GQA are exact. The value scale and RoPE are applied before (Attention.attend), with the
global positions, which the sharded position_ids carry.
Requirement: within one document, positions advance by one per token (what packing and plain batches
give), so the window in positions is the window in tokens.

Loss: `shard_batch` builds the targets (and the MTP layers' shifted ids) on the whole sequence before
sharding, so a target on another rank needs no exchange; `cp_loss` sums per rank and divides by the
global target count (one all-reduce of counts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..ops.attention import AttnMeta, attention
from .collectives import all_to_all

IGNORE = -100


# ----------------------------------------------------------------------------- layout
def zigzag_index(seq_len: int, world: int, rank: int) -> torch.Tensor:
    """Global token indices rank `rank` holds, in local order -> LongTensor [seq_len // world]."""
    check_seq_len(seq_len, world)
    C = seq_len // (2 * world)
    a, b = rank, 2 * world - 1 - rank
    return torch.cat([torch.arange(a * C, (a + 1) * C), torch.arange(b * C, (b + 1) * C)])


def check_seq_len(seq_len: int, world: int) -> None:
    if world < 1:
        raise ValueError(f"context-parallel world size must be >= 1, got {world}")
    if seq_len % (2 * world):
        raise ValueError(f"context parallelism over {world} ranks needs a sequence length divisible by "
                         f"2 * {world} = {2 * world} (zigzag chunks); got {seq_len}")


def shard(x: torch.Tensor, world: int, rank: int, dim: int = 1) -> torch.Tensor:
    """The part of x [.., T (at dim), ..] rank `rank` holds: [.., T / world, ..]."""
    return x.index_select(dim, zigzag_index(x.shape[dim], world, rank).to(x.device))


def unshard(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of `shard`: parts[r] = shard(x, len(parts), r) -> x."""
    world = len(parts)
    full = torch.cat(parts, dim)
    order = torch.cat([zigzag_index(full.shape[dim], world, r) for r in range(world)])
    return full.index_select(dim, torch.argsort(order).to(full.device))


# ----------------------------------------------------------------------------- collectives with autograd
class _AllGatherRows(torch.autograd.Function):
    """x [n, F] -> [world * n, F] (rank order); backward: reduce-scatter of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed after torch 2.11
        gather(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        world = dist.get_world_size(ctx.group)
        gx = g.new_empty((g.shape[0] // world,) + tuple(g.shape[1:]))
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed after 2.11
        scatter(gx, g.contiguous(), group=ctx.group)
        return gx, None


# ----------------------------------------------------------------------------- halo plan
@dataclass(frozen=True)
class _HaloPlan:
    """Which local rows go where for the SWA halo exchange of one rank (pure function of T, N, W, rank).

    send: local row indices to send, destination-major; send_counts / recv_counts per rank;
    gather: [2, W-1] index into [received rows, one zero row] giving each chunk's halo in token order
    (the zero row stands for tokens before the sequence start).
    """

    send: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    gather: torch.Tensor
    before_start: torch.Tensor  # [2, W-1] bool: halo slot lies before token 0


def _halo_plan(seq_len: int, world: int, rank: int, halo: int) -> _HaloPlan:
    C = seq_len // (2 * world)

    def owner(i: int) -> tuple[int, int]:  # global token -> (rank, local row)
        ch, off = divmod(i, C)
        return (ch, off) if ch < world else (2 * world - 1 - ch, off + C)

    def needs(r: int) -> list[list[int]]:  # global tokens of rank r's two halos (negative: before start)
        return [list(range(c * C - halo, c * C)) for c in (r, 2 * world - 1 - r)]

    send = [[owner(i)[1] for hal in needs(dst) for i in hal if i >= 0 and owner(i)[0] == rank]
            for dst in range(world)]
    mine = needs(rank)
    recv_counts = [sum(1 for hal in mine for i in hal if i >= 0 and owner(i)[0] == src) for src in range(world)]
    # position of each needed token in the received buffer (source-major, then in request order)
    base = [sum(recv_counts[:s]) for s in range(world)]
    seen = [0] * world
    total = sum(recv_counts)
    gather = []
    for hal in mine:
        row = []
        for i in hal:
            if i < 0:
                row.append(total)  # the zero row
            else:
                s = owner(i)[0]
                row.append(base[s] + seen[s])
                seen[s] += 1
        gather.append(row)
    return _HaloPlan(send=torch.tensor([i for s in send for i in s], dtype=torch.long),
                     send_counts=[len(s) for s in send], recv_counts=recv_counts,
                     gather=torch.tensor(gather, dtype=torch.long).view(2, halo),
                     before_start=torch.tensor([[i < 0 for i in hal] for hal in mine]).view(2, halo))


# ----------------------------------------------------------------------------- the CP group
class ContextParallel:
    """A context-parallel group: rank `rank` of `world` holds its zigzag shard of each sequence.

    group: a torch.distributed process group (None = the default group).
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._plans: dict[tuple[int, int], _HaloPlan] = {}

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """x [.., T, ..] (the whole sequence, the same on every rank) -> this rank's [.., T / world, ..]."""
        return shard(x, self.world, self.rank, dim)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Inverse of `shard` over the group, differentiable: local [.., T / world, ..] -> [.., T, ..]."""
        rows = _AllGatherRows.apply(x.movedim(dim, 0), self.group)
        return unshard(list(rows.chunk(self.world, 0)), 0).movedim(0, dim)

    def halo_plan(self, seq_len: int, halo: int) -> _HaloPlan:
        key = (seq_len, halo)
        if key not in self._plans:
            self._plans[key] = _halo_plan(seq_len, self.world, self.rank, halo)
        return self._plans[key]

    def exchange_halo(self, rows: torch.Tensor, halo: int) -> torch.Tensor:
        """rows [T / world, F] (local tokens) -> [2, halo, F]: the `halo` rows before each local chunk, in
        token order (zeros before the sequence start). Differentiable: gradients return to the owners."""
        plan = self.halo_plan(rows.shape[0] * self.world, halo)
        out = all_to_all(rows.index_select(0, plan.send.to(rows.device)), plan.recv_counts, plan.send_counts,
                         self.group)
        out = torch.cat([out, out.new_zeros((1,) + tuple(out.shape[1:]))])
        return out.index_select(0, plan.gather.view(-1).to(rows.device)).view(2, halo, *rows.shape[1:])

    def all_gather(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [n, F] -> [world * n, F] in rank order; the backward reduce-scatters the gradient."""
        return _AllGatherRows.apply(rows, self.group)


def _rows(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """k [B, Hkv, T, Dk], v [B, Hkv, T, Dv] -> [T, B * Hkv * (Dk + Dv)] (one row per token)."""
    T = k.shape[2]
    return torch.cat([k.permute(2, 0, 1, 3).reshape(T, -1), v.permute(2, 0, 1, 3).reshape(T, -1)], 1)


def _unrows(rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of _rows: rows [*lead, T, F] -> k' [*lead, B, Hkv, T, Dk], v' [*lead, B, Hkv, T, Dv]."""
    B, H, _, Dk = k.shape
    Dv = v.shape[-1]
    L = rows.dim() - 2
    lead, T = rows.shape[:L], rows.shape[L]
    order = (*range(L), L + 1, L + 2, L, L + 3)  # [*lead, T, B, H, D] -> [*lead, B, H, T, D]
    kr, vr = rows.split([B * H * Dk, B * H * Dv], -1)
    return (kr.reshape(*lead, T, B, H, Dk).permute(order), vr.reshape(*lead, T, B, H, Dv).permute(order))


def _meta_rows(meta: AttnMeta) -> torch.Tensor:
    """Positions and segments of the local tokens as rows [T, 2B] long (segments 0 where there are none)."""
    seg = meta.k_seg if meta.k_seg is not None else torch.zeros_like(meta.k_pos)
    return torch.cat([meta.k_pos, seg], 0).t()


# ----------------------------------------------------------------------------- attention
class ContextParallelAttention:
    """What an Attention module calls instead of ops.attention.attention when its sequence is sharded.

    Same signature and shapes, on the local shard: q [B, H, 2C, Dqk], k [B, Hkv, 2C, Dqk],
    v [B, Hkv, 2C, Dv], meta (local positions/segments, aligned) -> [B, H, 2C, Dv].
    """

    def __init__(self, cp: ContextParallel) -> None:
        self.cp = cp

    def attention(self, q, k, v, meta: AttnMeta, scale: float, window: int | None = None,
                  sink: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
        if not meta.aligned or q.shape[2] != k.shape[2]:
            raise ValueError("context-parallel attention takes the local shard's own keys (no KV cache)")
        if q.shape[2] % 2:
            raise ValueError(f"a context-parallel shard holds two equal chunks; got {q.shape[2]} tokens")
        if window is None:
            return self._full(q, k, v, meta, scale, sink, backend)
        return self._swa(q, k, v, meta, scale, window, sink, backend)

    def _full(self, q, k, v, meta, scale, sink, backend):
        """Local queries against every key of the sequence (K/V all-gathered)."""
        B = q.shape[0]
        kx, vx = _unrows(self.cp.all_gather(_rows(k, v)), k, v)  # [B, Hkv, T, D]
        pos_seg = self.cp.all_gather(_meta_rows(meta)).t()  # [2B, T]
        k_pos, k_seg = pos_seg[:B], pos_seg[B:]
        full = AttnMeta(q_pos=meta.q_pos, k_pos=k_pos, q_seg=meta.q_seg,
                        k_seg=k_seg if meta.k_seg is not None else None, aligned=False)
        return attention(q, kx, vx, full, scale, None, sink, backend)

    def _swa(self, q, k, v, meta, scale, window, sink, backend):
        """Each chunk attended as [halo + chunk]; the halo's queries are zeros and their outputs dropped."""
        B, H, T2, Dqk = q.shape
        C, halo = T2 // 2, window - 1
        rows = _rows(k, v)  # [2C, F]
        ext = torch.cat([self.cp.exchange_halo(rows, halo), rows.view(2, C, -1)], 1)  # [2, halo + C, F]
        kx, vx = _unrows(ext, k, v)  # [2, B, Hkv, L, D]
        L = halo + C
        kx, vx = kx.reshape(2 * B, *kx.shape[2:]), vx.reshape(2 * B, *vx.shape[2:])
        mrows = _meta_rows(meta)
        mext = torch.cat([self.cp.exchange_halo(mrows, halo), mrows.view(2, C, -1)], 1)  # [2, L, 2B]
        before = self.cp.halo_plan(T2 * self.cp.world, halo).before_start.to(q.device)
        seg = mext[:, :, B:].masked_fill(F.pad(before, (0, C))[:, :, None], -1)  # before token 0: a padding key
        pos = mext[:, :, :B].permute(0, 2, 1).reshape(2 * B, L)
        seg = seg.permute(0, 2, 1).reshape(2 * B, L)
        qc = q.view(B, H, 2, C, Dqk).permute(2, 0, 1, 3, 4)  # [2, B, H, C, Dqk]
        qx = torch.cat([qc.new_zeros(2, B, H, halo, Dqk), qc], 3).reshape(2 * B, H, L, Dqk)
        out = attention(qx, kx, vx, AttnMeta(q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, aligned=True),
                        scale, window, sink, backend)  # [2B, H, L, Dv]
        out = out[:, :, halo:].reshape(2, B, H, C, -1).permute(1, 2, 0, 3, 4)
        return out.reshape(B, H, T2, -1)


def apply_context_parallel(model: torch.nn.Module, cp: ContextParallel | None) -> torch.nn.Module:
    """Make every Attention module of `model` attend over the CP group (None: back to local attention).
    The model's inputs must then be the shards of `shard_batch`."""
    from ..model.attention import Attention

    for m in model.modules():
        if isinstance(m, Attention):
            m.context_parallel = ContextParallelAttention(cp) if cp is not None else None
    return model


# ----------------------------------------------------------------------------- batch and loss
@dataclass
class CPBatch:
    """This rank's shard of a batch, everything [B, T / world].

    targets[s - 1]: the target of each position s tokens ahead (s = 1 the main head, s = k + 2 MTP
    layer k), -100 where none; mtp_ids[k]: the token k + 1 ahead (MTP layer k's input).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor | None
    targets: list[torch.Tensor]
    mtp_ids: list[torch.Tensor]


def shard_batch(cp: ContextParallel, input_ids: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                n_mtp: int = 0) -> CPBatch:
    """Shift on the whole sequence, then shard. input_ids, labels [B, T] (labels = the ids, -100 where not a
    target, as the model takes them); position_ids / segment_ids [B, T] or None.

    The targets are model.loss.shifted_targets (the rule MiMoForCausalLM.forward and the Trainer share: none
    across a document boundary).
    """
    from ..model.loss import shifted_targets

    B, T = input_ids.shape
    check_seq_len(T, cp.world)
    for name, t in (("labels", labels), ("position_ids", position_ids), ("segment_ids", segment_ids)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, input_ids {tuple(input_ids.shape)}")
    if position_ids is None:
        position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
    targets = [cp.shard(shifted_targets(labels, s, segment_ids)) for s in range(1, n_mtp + 2)]
    mtp_ids = [cp.shard(F.pad(input_ids[:, k + 1:], (0, k + 1), value=0)) for k in range(n_mtp)]
    return CPBatch(cp.shard(input_ids), cp.shard(position_ids),
                   cp.shard(segment_ids) if segment_ids is not None else None, targets, mtp_ids)


@dataclass
class CPLoss:
    """loss: this rank's differentiable share (the shares sum over the group to the global loss);
    lm_loss / mtp_losses / total: the global values (detached, the same on every rank)."""

    loss: torch.Tensor
    total: torch.Tensor
    lm_loss: torch.Tensor
    mtp_losses: list[torch.Tensor]


def cp_head_sums(model, batch: CPBatch) -> list[torch.Tensor]:
    """Forward a MiMoForCausalLM (with `apply_context_parallel` done) on this rank's shard -> the summed cross
    entropy of each head over this rank's targets (main head, then MTP layer k), fp32 scalars, differentiable.
    The backward of each head writes its gradient over its logits (nothing reads them again)."""
    from ..ops.loss import cross_entropy_sum

    seg = batch.segment_ids
    meta = AttnMeta(q_pos=batch.position_ids, k_pos=batch.position_ids, q_seg=seg, k_seg=seg, aligned=True)
    h = model.model(batch.input_ids, meta)
    sums = [cross_entropy_sum(model.lm_head(h), batch.targets[0], inplace=True).float()]
    h_prev = h
    for k, ids in enumerate(batch.mtp_ids):
        lg, h_prev = model.mtp_step(k, ids, h_prev, meta)
        sums.append(cross_entropy_sum(lg, batch.targets[k + 1], inplace=True).float())
        del lg
    return sums


def cp_loss(model, cp: ContextParallel, batch: CPBatch) -> CPLoss:
    """Forward a MiMoForCausalLM (with `apply_context_parallel` done) on a shard -> CPLoss.

    Each head's loss is the mean over the targets of the whole sequence (token-weighted: local sums,
    global counts); with MTP, total = lm + mtp_loss_weight * mean of the MTP layers' losses, as in
    MiMoForCausalLM.forward. Backward on `loss`, then sum the parameter gradients over the group.
    """
    sums = cp_head_sums(model, batch)
    counts = torch.stack([(t != IGNORE).sum() for t in batch.targets]).float()
    dist.all_reduce(counts, group=cp.group)
    shares = [s / c.clamp_min(1) for s, c in zip(sums, counts, strict=True)]
    loss = shares[0]
    if len(shares) > 1:
        loss = loss + model.config.mtp_loss_weight * torch.stack(shares[1:]).mean()
    values = torch.stack(shares + [loss]).detach()
    dist.all_reduce(values, group=cp.group)
    return CPLoss(loss=loss, total=values[-1], lm_loss=values[0], mtp_losses=list(values[1:-1]))
