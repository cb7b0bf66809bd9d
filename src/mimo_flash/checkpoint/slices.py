"""Reading part of a checkpoint tensor into part of one of ours: what a tensor-parallel rank loads.

A `Piece` says that the local tensor's box `local` holds the full tensor's box `full` (both one slice per
dim, same extents). A checkpoint `Source` (load.py) fills the full tensor's box `dst`, possibly with a
leading int (a per-expert checkpoint tensor filling one expert of our fused [E, ...] tensor). `intersect` turns the two into the index to read from
the checkpoint tensor and the local box it fills; `read_slice` reads only that part: for a float8 tensor,
the 128x128 blocks that cover it and their scales, dequantized, then cut (a slice that starts inside a
block reads the whole block: the scale is per block, so nothing is requantized here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.blocks import FP8, SCALE_SUFFIX, dequantize_box


@dataclass(frozen=True)
class Piece:
    """local tensor[local] = full tensor[full]; one slice per dim, with concrete start and stop."""
    local: tuple[slice, ...]
    full: tuple[slice, ...]


def whole(shape: tuple[int, ...]) -> Piece:
    box = tuple(slice(0, n) for n in shape)
    return Piece(box, box)


def _box(index: tuple | None, shape: tuple[int, ...]) -> list[tuple[int, int, bool]]:
    """An index (ints and slices with step 1, leading; None = all) -> [(start, stop, is_int)] per dim."""
    index = () if index is None else index
    out = []
    for d, n in enumerate(shape):
        i = index[d] if d < len(index) else slice(None)
        if isinstance(i, int):
            out.append((i, i + 1, True))
        else:
            start, stop, step = i.indices(n)
            if step != 1:
                raise ValueError(f"index {index}: slices must have step 1")
            out.append((start, stop, False))
    return out


def intersect(piece: Piece, src: tuple | None, shape: tuple[int, ...]) -> tuple[tuple, tuple] | None:
    """piece of the full tensor [shape]; src: the full tensor's box a checkpoint tensor fills (None = all)
    -> (index into the checkpoint tensor, local box it fills), or None when they do not overlap."""
    ck, local = [], []
    for (s0, s1, is_int), p, loc in zip(_box(src, shape), piece.full, piece.local, strict=True):
        a, b = max(s0, p.start), min(s1, p.stop)
        if a >= b:
            return None
        if not is_int:  # the checkpoint tensor has no such dim
            ck.append(slice(a - s0, b - s0))
        local.append(slice(loc.start + a - p.start, loc.start + b - p.start))
    return tuple(ck), tuple(local)


def read_slice(dst: torch.Tensor, reader, key: str, block: tuple[int, int], index: tuple) -> None:
    """dst = checkpoint tensor `key`[index] (FP8 dequantized with its block scales), cast to dst's dtype.

    index: one slice per dim of the checkpoint tensor; dst has the selected shape, or that shape with
    leading size-1 dims (one expert of our fused tensor)."""
    t = reader.get(key)
    if t.dtype != FP8:
        dst.copy_(t[index])
        return
    dst.copy_(dequantize_box(t, reader.get(key + SCALE_SUFFIX), index, block, dtype=dst.dtype))
