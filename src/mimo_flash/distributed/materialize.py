"""Materialize a model built on the meta device: each rank allocates and fills only the shards it keeps.

The Trainer builds MiMoForCausalLM under `torch.device("meta")`, shards it (parallelize_for_training: expert
parallelism, FSDP2), then calls `init.fill(model, device)` with one of
    SeededInit(seed)      the model's initialisation (model.model.init_rules), drawn so that the values do
                          not depend on how the tensor is sharded: each tensor is cut along dim 0 into blocks
                          of about 2^20 elements, block b of tensor `name` drawn from its own generator seeded
                          by hash(seed, name, b). A rank draws only the blocks its rows meet, so 1, 2 or N
                          ranks, with or without expert parallelism, hold the same weights.
    CheckpointInit(path)  a hub / transformers checkpoint (checkpoint/load.py's plan): each rank reads only
                          the rows of each tensor that its shard holds, straight from the memory-mapped
                          safetensors, FP8 dequantized one 128-row block at a time.
Every sharded tensor here is a plain tensor (whole on every rank) or a DTensor whose ranks each hold one
contiguous block of rows: sharded on dim 0 over a 1-D mesh (FSDP2's layout, and the experts' "ep" layout), or
the experts' FSDP2 layout over ("edp", "ep") (distributed/training.py: the "ep" shard, then its "edp" chunk).
`row_blocks` gives every rank's rows, `local_rows` this rank's.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path

import torch
import torch.nn as nn

from .training import parameter_name

BLOCK_ELEMENTS = 1 << 20


def _chunk(lo: int, hi: int, n: int, i: int) -> tuple[int, int]:
    """Rows of piece i when rows lo..hi are cut into n as torch.chunk cuts them (DTensor's and FSDP2's split)."""
    size = -(-(hi - lo) // n)
    a = min(lo + i * size, hi)
    return a, min(a + size, hi)


def row_blocks(t: torch.Tensor) -> list[tuple[int, int, int]] | None:
    """[(global rank, first row, end row)] of every rank of a DTensor's mesh, each holding one contiguous block
    of dim 0: Shard(0) on every mesh dimension (cut in mesh order), or FSDP2's 2-D composition
    (_StridedShard(0, split_factor=n1), Shard(0)) over a mesh of shape (n0, n1): the rows cut over dim 1 first,
    then each piece over dim 0. None for any other placement (or a plain tensor)."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if not isinstance(t, DTensor):
        return None
    mesh, pl = t.device_mesh, tuple(t.placements)
    if all(type(p) is Shard and p.dim == 0 for p in pl):
        order = list(range(mesh.ndim))
    elif (mesh.ndim == 2 and isinstance(pl[0], _StridedShard) and pl[0].dim == 0
          and pl[0].split_factor == mesh.size(1) and type(pl[1]) is Shard and pl[1].dim == 0):
        order = [1, 0]
    else:
        return None
    ranks = mesh.mesh
    out = []
    for coord in itertools.product(*(range(n) for n in ranks.shape)):
        lo, hi = 0, t.shape[0]
        for d in order:
            lo, hi = _chunk(lo, hi, mesh.size(d), coord[d])
        out.append((int(ranks[coord]), lo, hi))
    return out


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(this rank's local tensor, first row, end row) of t along dim 0: the whole of a plain tensor; this
    rank's block of a DTensor whose ranks hold blocks of rows (row_blocks)."""
    if not hasattr(t, "device_mesh"):
        return t, 0, t.shape[0] if t.dim() else 1
    import torch.distributed as dist

    blocks = row_blocks(t)
    if blocks is None:
        raise ValueError(f"cannot materialize a DTensor with placements {t.placements} over a {t.device_mesh.ndim}-D "
                         "mesh (expected Shard(0) over each mesh dimension, or FSDP2's (_StridedShard(0), Shard(0)))")
    me = dist.get_rank()
    (lo, hi), = [(a, b) for r, a, b in blocks if r == me]
    local = t.to_local()
    if local.shape[0] != hi - lo:
        raise RuntimeError(f"a {tuple(t.shape)} DTensor's local shard has {local.shape[0]} rows, expected {hi - lo}")
    return local, lo, hi


def _owned(model: nn.Module):
    """(name, module, attribute) of every parameter and persistent buffer, names as in the state dict (without
    the activation-checkpoint wrapper's prefix), each tensor once (tied weights)."""
    seen = set()
    for mname, m in model.named_modules():
        names = list(m._parameters) + [b for b in m._buffers if b not in m._non_persistent_buffers_set]
        for attr in names:
            t = getattr(m, attr)
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            yield parameter_name(f"{mname}.{attr}" if mname else attr), m, attr


def _block_seed(seed: int, name: str, block: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()[:8], "little") >> 1


class SeededInit:
    """The model's initialisation (model.model.init_rules), independent of the sharding (see the module doc)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def rows(self, name: str, shape: tuple[int, ...], std: float, lo: int, hi: int) -> torch.Tensor:
        """Rows lo..hi of tensor `name` [shape] as drawn from N(0, std): fp32 [hi - lo, *shape[1:]]."""
        shape = tuple(shape) or (1,)
        per_row = max(1, int(torch.Size(shape[1:]).numel()))
        block = max(1, BLOCK_ELEMENTS // per_row)
        out = torch.empty((hi - lo,) + shape[1:])
        for b in range(lo // block, -(-hi // block)):
            a, e = b * block, min((b + 1) * block, shape[0])
            g = torch.Generator().manual_seed(_block_seed(self.seed, name, b))
            vals = torch.randn((e - a,) + shape[1:], generator=g).mul_(std)
            x, y = max(a, lo), min(e, hi)
            out[x - lo:y - lo] = vals[x - a:y - a]
        return out

    @torch.no_grad()
    def fill(self, model: nn.Module, device: torch.device) -> None:
        from ..model.model import init_rules

        model.to_empty(device=device)
        config = model.config
        rules = {}
        for _, m in model.named_modules():
            for attr, kind in init_rules(m, config):
                rules[(id(m), attr)] = kind
        for name, m, attr in _owned(model):
            if (id(m), attr) not in rules:
                raise RuntimeError(f"{name}: no initialisation rule (model.model.init_rules)")
            kind = rules[(id(m), attr)]
            local, lo, hi = local_rows(getattr(m, attr))
            if kind == "normal":
                vals = self.rows(name, tuple(getattr(m, attr).shape), config.initializer_range, lo, hi)
                local.copy_(vals.view(local.shape))
            else:
                local.fill_(kind)


class CheckpointInit:
    """Fill the shards from a checkpoint directory (hub or transformers layout, FP8 or not)."""

    def __init__(self, path: str | os.PathLike, strict: bool = True) -> None:
        self.path, self.strict = Path(path), strict

    def config(self):
        """The MiMoConfig to build the model from (the checkpoint's, MTP layers as the checkpoint has them)."""
        from ..checkpoint.load import plan_checkpoint
        from ..checkpoint.reader import CheckpointReader

        with CheckpointReader(self.path) as reader:
            return plan_checkpoint(reader, strict=self.strict).config

    @torch.no_grad()
    def fill(self, model: nn.Module, device: torch.device) -> None:
        from ..quant.blocks import FP8, SCALE_SUFFIX
        from ..checkpoint.load import check_finite, plan_checkpoint
        from ..checkpoint.reader import CheckpointReader

        model.to_empty(device=device)
        owned = {name: getattr(m, attr) for name, m, attr in _owned(model)}
        with CheckpointReader(self.path) as reader:
            plan = plan_checkpoint(reader, strict=self.strict)
            if set(plan.tensors) != set(owned):
                diff = sorted(set(plan.tensors) ^ set(owned))
                raise ValueError(f"{self.path}: the checkpoint's tensors do not match the model's: {diff[:5]}")
            for name, (_, sources) in plan.tensors.items():
                local, lo, hi = local_rows(owned[name])
                for s in sources:
                    fp8 = reader.info(s.key).dtype == FP8
                    for dst, src_rows in _pieces(s.dst, lo, hi):
                        target = local if dst is None else local[dst]
                        target.copy_(_read_rows(reader, s.key, plan.block, src_rows).view(target.shape))
                        check_finite(target, plan.where(s.key), fp8)
                    reader.release(s.key)
                    if fp8:
                        reader.release(s.key + SCALE_SUFFIX)


def _pieces(dst: tuple | None, lo: int, hi: int) -> list[tuple[tuple | None, tuple[int, int] | None]]:
    """The parts of one checkpoint source that land in local rows lo..hi of our tensor:
    [(index into the local tensor, (first, end) rows of the source or None for all of it)].

    dst (checkpoint/names.py hub_parts): None = the whole tensor; (slice(a, b),) = rows a..b; (e,) = row e
    (one expert); (e, slice) = part of row e."""
    if dst is None:
        return [(None, (lo, hi))] if hi > lo else []
    first = dst[0]
    if isinstance(first, slice):
        a, b = max(first.start, lo), min(first.stop, hi)
        return [((slice(a - lo, b - lo),) + tuple(dst[1:]), (a - first.start, b - first.start))] if b > a else []
    if lo <= first < hi:
        return [((first - lo,) + tuple(dst[1:]), None)]
    return []


def _read_rows(reader, key: str, block: tuple[int, int], rows: tuple[int, int] | None) -> torch.Tensor:
    """Rows a..b (None: all) of checkpoint tensor `key`, FP8 dequantized (only the 128-row blocks they meet)
    -> fp32 (or the stored dtype for others; the caller's copy_ casts)."""
    from ..quant.blocks import FP8, SCALE_SUFFIX, dequantize

    t = reader.get(key)
    if t.dtype != FP8:
        return t if rows is None else t[rows[0]:rows[1]]
    s = reader.get(key + SCALE_SUFFIX)
    if rows is None:
        return dequantize(t, s, block)
    a, b = rows
    if t.dim() > 2:  # fused experts [E, R, C]: whole experts a..b
        return dequantize(t[a:b], s[a:b], block)
    br = block[0]
    i0, i1 = a // br, -(-b // br)
    deq = dequantize(t[i0 * br:min(i1 * br, t.shape[0])], s[i0:i1], block)
    return deq[a - i0 * br:b - i0 * br]
