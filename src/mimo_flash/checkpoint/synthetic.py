"""Synthetic checkpoints in the release's exact format, for tests and benchmarks.

write_synthetic_checkpoint(path, config) writes random weights for any MiMoConfig as the release
stores them: hub names, sharded safetensors + index, q/k/v and SwiGLU projections in
float8_e4m3fn with a float32 `_scale_inv` per block (every block's scale distinct), everything else
bf16, router weight and correction bias fp32, config.json with quantization_config. Tensors are
generated one at a time (deterministically from the seed and the name), so checkpoints of many
GB take no more memory than their largest tensor.
"""

from __future__ import annotations

import os
import zlib

import torch

from ..config import MiMoConfig
from .files import Entry
from ..quant.blocks import FP8, FP8_MAX, SCALE_SUFFIX, scale_grid
from .names import LAYOUTS, is_fp32, is_quantized, layer_index, layout_parts
from .save import QuantizedPair, fp8_quantization_config, write_checkpoint

WEIGHT_STD = 0.02


def _generator(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed((zlib.crc32(name.encode()) << 16) ^ seed)


def synthetic_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A plausible unquantized tensor for checkpoint name `name`: norms ~1, weights ~N(0, 0.02^2)."""
    g = _generator(name, seed)
    x = torch.randn(shape, generator=g)
    if name.endswith("norm.weight"):
        x = 1.0 + 0.1 * x
    elif "sink" in name:
        x = 0.5 * x
    elif name.endswith("e_score_correction_bias"):
        x = 0.01 * x
    else:
        x = WEIGHT_STD * x
    return x.to(dtype)


def synthetic_fp8(name: str, shape: tuple[int, ...], block: tuple[int, int], seed: int = 0,
                  extra: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [..., R, C] float8_e4m3fn, scale_inv [..., r + extra[0], c + extra[1]] fp32) for weight `name`.

    Every block gets its own scale (a random permutation of distinct values around
    WEIGHT_STD / 100, so that weights come out ~N(0, 0.02^2)); extra trailing rows/cols, if asked
    for, hold 1e6 so that a reader that uses them gives visibly wrong weights.
    """
    g = _generator(name, seed)
    q = (torch.randn(shape, generator=g) * 100.0).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    grid = scale_grid(shape, block)
    n = 1
    for d in grid:
        n *= d
    distinct = (torch.randperm(n, generator=g).float() + torch.rand(n, generator=g)) / n  # distinct in [0, 1)
    scale = (WEIGHT_STD / 100.0) * (0.5 + distinct).view(grid)
    if extra != (0, 0):
        *lead, r, c = grid
        big = torch.full((*lead, r + extra[0], c + extra[1]), 1e6)
        big[..., :r, :c] = scale
        scale = big
    return q, scale


def write_synthetic_checkpoint(path: str | os.PathLike, config: MiMoConfig, *, fp8: bool = True,
                               block_size: tuple[int, int] = (128, 128), dtype: torch.dtype = torch.bfloat16,
                               layout: str = "hub", max_shard_size: int | str = "2GB", seed: int = 0,
                               kproj_extra_scale: tuple[int, int] = (0, 0), progress: bool | None = None) -> dict:
    """Write a random checkpoint for `config` at `path` (see the module docstring).

    fp8=False writes every tensor in `dtype` (routers fp32). kproj_extra_scale=(rows, cols) gives the
    full-attention k_proj scales that many extra trailing rows/cols (the release's k_proj trap).
    layout='transformers' writes fused experts and `sinks` instead of hub names.
    Returns write_checkpoint's summary ({"path", "shards", "tensors", "bytes"}).
    """
    from ..model import MiMoForCausalLM

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    block = tuple(block_size)
    config = config.replace(torch_dtype=str(dtype).removeprefix("torch."),
                            quantization_config=fp8_quantization_config(block) if fp8 else None)
    with torch.device("meta"):
        state = MiMoForCausalLM(config).state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    groups = []
    for name, t in state.items():
        for key, idx in layout_parts(name, t.shape, layout, config):
            shape = tuple((t if idx is None else t[idx]).shape)
            if fp8 and is_quantized(key):
                L = layer_index(key)
                trap = ".self_attn.k_proj." in key and L is not None and not config.is_swa(L)
                extra = kproj_extra_scale if trap else (0, 0)
                grid = scale_grid(shape, block)
                sshape = (*grid[:-2], grid[-2] + extra[0], grid[-1] + extra[1])
                pair = QuantizedPair(lambda key=key, shape=shape, extra=extra:
                                     synthetic_fp8(key, shape, block, seed, extra))
                groups.append([Entry(key + SCALE_SUFFIX, torch.float32, sshape, pair.scale),
                               Entry(key, FP8, shape, pair.weight)])
            else:
                dt = torch.float32 if is_fp32(key) else dtype
                groups.append([Entry(key, dt, shape, lambda key=key, shape=shape, dt=dt:
                                     synthetic_tensor(key, shape, dt, seed))])
    return write_checkpoint(path, config.to_dict(), groups, max_shard_size, progress=progress)
