"""Export a sharded (FSDP2 / expert-parallel) model to the hub format, tensor by tensor.

No rank gathers the whole model: rank 0 writes the checkpoint (checkpoint/save.py write_checkpoint, which asks
for one tensor at a time) and every other rank walks the same list of tensors, contributing its shard of the
one being written. A tensor whose ranks each hold a block of rows (distributed.materialize.row_blocks: FSDP2's
dim-0 layout, the experts' "ep" and ("edp", "ep") layouts) reaches rank 0 by point-to-point sends of just the
rows it needs (one expert's slice of a fused expert tensor comes from the rank that holds it); any other layout
is gathered with DTensor.full_tensor() (one parameter at a time, kept while its per-expert parts are written).
With fp8=True, the tensors the release quantizes are written as float8_e4m3fn with real 128 x 128 block scales.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..checkpoint.load import parse_dtype
from ..checkpoint.names import layout_parts
from ..checkpoint.save import OutTensor, export_groups, fp8_quantization_config, write_checkpoint
from ..distributed.materialize import row_blocks


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _row_blocks(t: torch.Tensor) -> list[tuple[int, int, int]] | None:
    """Every rank's block of rows of t (row_blocks), when its mesh holds global rank 0 (the same answer on every
    rank); else None."""
    blocks = row_blocks(t)
    return blocks if blocks is not None and any(r == 0 for r, _, _ in blocks) else None


def _rows_to_rank0(t: DTensor, blocks: list[tuple[int, int, int]], lo: int, hi: int) -> torch.Tensor | None:
    """Rows lo..hi of a DTensor held in blocks of rows on rank 0 (None elsewhere); only the owners of those rows
    send."""
    me = dist.get_rank()
    local = t.to_local()
    out = local.new_empty((hi - lo,) + tuple(t.shape[1:])) if me == 0 else None
    for gr, first, end in blocks:
        a, b = max(lo, first), min(hi, end)
        if a >= b:
            continue
        if gr == me:
            piece = local[a - first: b - first]
            if piece.shape[0] != b - a:
                raise RuntimeError(f"rank {me}: its shard of a {tuple(t.shape)} tensor has {local.shape[0]} rows, "
                                   f"expected rows {first}..{end}")
            if me == 0:
                out[a - lo:b - lo] = piece
            else:
                dist.send(piece.contiguous(), dst=0)
        elif me == 0:
            buf = local.new_empty((b - a,) + tuple(t.shape[1:]))
            dist.recv(buf, src=gr)
            out[a - lo:b - lo] = buf
    return out


class _Source:
    """One tensor of the state dict, handed to rank 0 part by part."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.full = t, None

    def part(self, idx: tuple | None) -> torch.Tensor | None:
        t = self.t
        if not isinstance(t, DTensor):
            return t if idx is None else t[idx]
        blocks = _row_blocks(t)
        if blocks is not None:
            if idx is None:
                return _rows_to_rank0(t, blocks, 0, t.shape[0])
            if isinstance(idx[0], int):
                got = _rows_to_rank0(t, blocks, idx[0], idx[0] + 1)
                return None if got is None else got[(0, *idx[1:])]
        if self.full is None:
            self.full = t.full_tensor()
        return self.full if idx is None else self.full[idx]

    def done(self) -> None:
        self.full = None


def export_sharded(model: torch.nn.Module, path: str | os.PathLike, dtype=None, fp8: bool = False,
                   fp8_block_size: tuple[int, int] = (128, 128), max_shard_size: int | str = "5GB",
                   extra_files=()) -> dict | None:
    """Write the hub-format checkpoint of a (possibly sharded) MiMoForCausalLM at `path`; every rank calls it.

    dtype / fp8 / max_shard_size as checkpoint.save_pretrained. Returns write_checkpoint's summary on rank 0,
    None elsewhere.
    """
    cast = parse_dtype(dtype) if dtype is not None else None
    block = tuple(fp8_block_size) if fp8 else None
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tensors = []
    for name, t in state.items():
        src = _Source(t.detach())
        parts = layout_parts(name, t.shape, "hub", model.config)
        for j, (key, idx) in enumerate(parts):
            shape = tuple(t.shape) if idx is None else tuple(torch.empty(t.shape, device="meta")[idx].shape)

            def read(dt, src=src, idx=idx, last=j == len(parts) - 1):
                v = src.part(idx)
                if last:
                    src.done()
                return v.to("cpu", dt) if _rank() == 0 else None

            tensors.append(OutTensor(key, shape, t.dtype, read=read))
    groups = export_groups(tensors, cast, block)
    if _rank() == 0:
        config = model.config.replace(torch_dtype=str(cast or model.dtype).removeprefix("torch."),
                                      quantization_config=fp8_quantization_config(block) if block else None)
        summary = write_checkpoint(Path(path), config.to_dict(), groups, max_shard_size,
                                   extra_files=[Path(f) for f in extra_files], progress=False)
    else:
        # the same reads in the same order as rank 0's writer makes (one per tensor; an FP8 pair reads once)
        for t in tensors:
            t.read(t.dtype)
        summary = None
    if dist.is_initialized():
        dist.barrier()
    return summary
