"""Write checkpoints: hub (or transformers) names, sharded safetensors + index, optional FP8.

Everything is written tensor by tensor into a temporary directory beside the target, which then
takes the target's place in one rename (an atomic exchange where the OS has one). An interrupted
save leaves the previous checkpoint untouched; files in the target that are not part of a
checkpoint (tokenizer.json, ...) are carried over into the new one.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..quant.blocks import FP8, SCALE_SUFFIX, quantize, scale_grid
from .errors import CheckpointError
from .files import Entry, fsync_dir, temp_dir_for, unmark, write_safetensors
from .load import check_finite, parse_dtype, plan_checkpoint, progress_bar, read_into
from .names import LAYOUTS, is_fp32, is_quantized, layout_parts
from .reader import PICKLE_SUFFIXES, CheckpointReader

# Files that make up a checkpoint (replaced on save); anything else in the target directory stays.
_CHECKPOINT_FILE = re.compile(r"^(config\.json|model.*\.safetensors|model\.safetensors\.index\.json"
                              r"|pytorch_model.*\.bin|pytorch_model\.bin\.index\.json)$")


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '2GiB' / 1234 -> bytes."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"cannot read {size!r} as a size (e.g. '5GB', '500MB', 1000000)") from None


def fp8_quantization_config(block: tuple[int, int]) -> dict:
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}


@dataclass
class OutTensor:
    """A tensor to export under checkpoint name `name`: read(dtype) returns it [shape] in that dtype.

    `dtype` is its natural dtype, used when the caller asks for none. `fp8`, when set, returns it
    already quantized (q, scale_inv) with the export's block size (exact FP8 -> FP8 passthrough).
    """
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[torch.dtype], torch.Tensor]
    fp8: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None


def export_groups(tensors: Iterable[OutTensor], dtype: torch.dtype | None,
                  fp8_block: tuple[int, int] | None) -> list[list[Entry]]:
    """OutTensors -> groups of safetensors entries (an FP8 weight and its scale form one group).

    Router weight / correction bias: fp32. With fp8_block: the tensors the release quantizes become
    float8_e4m3fn + `<name>_scale_inv` fp32 [ceil(R/br), ceil(C/bc)]. Everything else: `dtype`, or
    the tensor's own dtype when dtype is None.
    """
    groups = []
    for t in tensors:
        if fp8_block is not None and is_quantized(t.name):
            pair = QuantizedPair(t.fp8 or (lambda t=t: quantize(t.read(torch.float32), fp8_block, t.name)))
            groups.append([Entry(t.name + SCALE_SUFFIX, torch.float32, scale_grid(t.shape, fp8_block), pair.scale),
                           Entry(t.name, FP8, t.shape, pair.weight)])
        else:
            out = torch.float32 if is_fp32(t.name) else (dtype or t.dtype)
            groups.append([Entry(t.name, out, t.shape, lambda t=t, out=out: t.read(out))])
    return groups


class QuantizedPair:
    """One FP8 tensor's two entries, computed once: `make()` -> (q, scale_inv); the scale is written first."""

    def __init__(self, make: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.make, self.q = make, None

    def scale(self) -> torch.Tensor:
        self.q, s = self.make()
        return s

    def weight(self) -> torch.Tensor:
        q, self.q = self.q, None
        return q if q is not None else self.make()[0]


def _shard(groups: list[list[Entry]], limit: int) -> list[list[Entry]]:
    """Greedy split in order; a group never straddles two shards."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for g in groups:
        n = sum(e.nbytes for e in g)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].extend(g)
        size += n
    return shards


def write_checkpoint(path: str | os.PathLike, config: dict, groups: list[list[Entry]],
                     max_shard_size: int | str = "5GB", extra_files: Iterable[Path] = (),
                     progress: bool | None = None) -> dict:
    """Write config.json, shards (+ index when more than one) and extra_files as directory `path`.

    Returns a summary: {"path", "shards", "tensors", "bytes"}.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory")
    limit = parse_size(max_shard_size)
    if limit <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(path)
    try:
        shards = _shard(groups, limit)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        total = sum(e.nbytes for s in shards for e in s)
        with progress_bar(total, "saving", progress) as bar:
            for name, entries in zip(names, shards):
                write_safetensors(tmp / name, entries, on_bytes=bar.update)
        if len(shards) > 1:
            weight_map = {e.name: name for name, s in zip(names, shards) for e in s}
            _write_json(tmp / "model.safetensors.index.json",
                        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        _write_json(tmp / "config.json", config)
        for f in extra_files:
            if not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
        if path.exists():
            _carry_over(path, tmp)
        unmark(tmp)
        fsync_dir(tmp)
        _swap(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": path, "shards": len(shards), "tensors": sum(len(s) for s in shards), "bytes": total}


def _write_json(f: Path, data: dict) -> None:
    with open(f, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def checkpoint_files(d: Path) -> set[str]:
    """Names of the entries of directory d that belong to a checkpoint (weights, index, config)."""
    names = {p.name for p in d.iterdir() if _CHECKPOINT_FILE.match(p.name)}
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            names |= set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            pass
    return names


def extra_files(d: Path) -> list[Path]:
    """Top-level files of a checkpoint directory that are not weights or config (tokenizer, ...)."""
    skip = checkpoint_files(d)
    return sorted(p for p in d.iterdir() if p.is_file() and p.name not in skip and not p.name.startswith(".")
                  and p.suffix not in (".safetensors", *PICKLE_SUFFIXES) and not p.name.endswith(".index.json"))


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) into `new` whatever of `old` is not a checkpoint file and not already in `new`."""
    skip = checkpoint_files(old)
    for p in old.iterdir():
        if p.name in skip or (new / p.name).exists() or p.name.startswith(f".{old.name}."):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.copytree(p, new / p.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(p, new / p.name)


def _link_or_copy(src, dst) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def _swap(tmp: Path, path: Path) -> None:
    """Put the finished directory `tmp` at `path`; the previous `path`, if any, is removed afterwards."""
    if not path.exists():
        os.rename(tmp, path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old checkpoint
    else:
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(path.parent)


# ----------------------------------------------------------------------------- model -> checkpoint
def save_pretrained(model, path: str | os.PathLike, dtype=None, fp8: bool = False,
                    max_shard_size: int | str = "5GB", layout: str = "hub",
                    fp8_block_size: tuple[int, int] = (128, 128), progress: bool | None = None) -> dict:
    """Write `model` as a checkpoint directory: hub config.json, sharded safetensors (+ index).

    dtype: cast floating tensors (None keeps each tensor's dtype); the router weight and correction
    bias are always fp32. fp8=True stores the tensors the release quantizes (q/k/v and SwiGLU
    projections) as float8_e4m3fn with per-block scales amax/448 and writes quantization_config.
    layout: 'hub' (release names, one tensor per expert) or 'transformers' (fused experts, `sinks`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if getattr(model, "parallel", None) is not None:
        raise ValueError("save_pretrained: this model holds one tensor / expert parallel rank's share; save the "
                         "checkpoint it was loaded from, or a model loaded in one process")
    cast = parse_dtype(dtype) if dtype is not None else None
    block = tuple(fp8_block_size) if fp8 else None
    state = model.state_dict()
    resident = [n for n, t in state.items() if t.dtype == FP8]
    if resident:  # not written yet: the expert tensors would need splitting into per-expert weights and scales
        raise CheckpointError(f"save_pretrained: the model holds FP8-resident weights ({resident[0]} and "
                              f"{len(resident) - 1} more, from fp8=True / quantize_model_), which cannot be saved "
                              "yet; save the float model (fp8=True here writes the release's FP8 format) or use "
                              "`mimo-flash convert --fp8`")
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tensors = []
    for name, t in state.items():
        for key, idx in layout_parts(name, t.shape, layout, model.config):
            v = (t if idx is None else t[idx]).detach()
            tensors.append(OutTensor(key, tuple(v.shape), v.dtype, read=lambda dt, v=v: v.to("cpu", dt)))
    config = model.config.replace(torch_dtype=str(cast or model.dtype).removeprefix("torch."),
                                  quantization_config=fp8_quantization_config(block) if block else None)
    return write_checkpoint(path, config.to_dict(), export_groups(tensors, cast, block), max_shard_size,
                            progress=progress)


# ------------------------------------------------------------------------ checkpoint -> checkpoint
def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype=None, fp8: bool = False,
                       load_mtp: bool = True, layout: str = "hub", max_shard_size: int | str = "5GB",
                       fp8_block_size: tuple[int, int] | None = None, allow_pickle: bool = False,
                       strict: bool = True, progress: bool | None = None) -> dict:
    """Convert a checkpoint without building the model: one tensor in memory at a time.

    Reads hub (FP8 or not), transformers' fused layout, or a mix; writes `layout` with `dtype`
    (None: each tensor's own, FP8 sources become config.torch_dtype) or FP8 (fp8=True; block size
    from the source when it is FP8, else 128x128, unless given). FP8 tensors whose source is FP8
    with the same block size are copied exactly. Non-checkpoint files of the source directory
    (tokenizer, generation config, ...) are copied along. Returns write_checkpoint's summary.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    cast = parse_dtype(dtype) if dtype is not None else None
    with CheckpointReader(src, allow_pickle=allow_pickle) as reader:
        plan = plan_checkpoint(reader, load_mtp=load_mtp, strict=strict)
        try:
            natural = parse_dtype(plan.config.torch_dtype)  # what FP8 sources dequantize to by default
        except ValueError:
            natural = torch.bfloat16
        src_fp8 = plan.raw.get("quantization_config") is not None
        block = None
        if fp8:
            block = tuple(fp8_block_size) if fp8_block_size else plan.block if src_fp8 else (128, 128)
        tensors = []
        for name, (shape, sources) in plan.tensors.items():
            meta = torch.empty(shape, device="meta")
            by_key = {s.key: s for s in sources}
            for key, idx in layout_parts(name, torch.Size(shape), layout, plan.config):
                if len(sources) == 1 and sources[0].dst is None:  # one checkpoint tensor holds all of ours
                    reads = [(sources[0].key, idx, None)]
                elif idx is None:  # assemble ours from its parts
                    reads = [(s.key, None, s.dst) for s in sources]
                else:
                    reads = [(by_key[key].key, None, None)]
                out_shape = tuple(meta[idx].shape) if idx is not None else shape
                first = reader.info(reads[0][0])
                tensors.append(OutTensor(key, out_shape, natural if first.dtype == FP8 else first.dtype,
                                         read=_reader_fn(plan, reads, out_shape),
                                         fp8=_passthrough_fn(plan, reads, out_shape, block)))
        # the source's config with every field in both formats; unknown keys (auto_map, ...) kept
        config = plan.config.replace(torch_dtype=str(cast).removeprefix("torch.") if cast else plan.config.torch_dtype)
        raw = {**plan.raw, **config.to_dict()}
        raw.pop("quantization_config", None)
        if block:
            raw["quantization_config"] = fp8_quantization_config(block)
        return write_checkpoint(dst, raw, export_groups(tensors, cast, block), max_shard_size,
                                extra_files=extra_files(reader.root), progress=progress)


def _reader_fn(plan, reads: list[tuple[str, tuple | None, tuple | None]], shape: tuple[int, ...]):
    """read(dtype) for an OutTensor made of checkpoint reads (key, index into it, index into the output)."""
    def read(dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        with torch.no_grad():
            for key, src, dsti in reads:
                read_into(out if dsti is None else out[dsti], plan.reader, key, plan.block, src)
                fp8 = plan.reader.info(key).dtype == FP8
                check_finite(out if dsti is None else out[dsti], plan.where(key), fp8)
                plan.reader.release(key)
                if fp8:
                    plan.reader.release(key + SCALE_SUFFIX)
        return out
    return read


def _passthrough_fn(plan, reads, shape, block):
    """For an FP8 source read whole with the export's block size: its (q, scale) copied exactly."""
    if block is None or len(reads) != 1 or reads[0][1:] != (None, None) or tuple(block) != tuple(plan.block):
        return None
    key = reads[0][0]
    if plan.reader.info(key).dtype != FP8:
        return None

    def fp8() -> tuple[torch.Tensor, torch.Tensor]:
        r, c = scale_grid(shape, block)[-2:]
        q = plan.reader.get(key).clone()
        s = plan.reader.get(key + SCALE_SUFFIX)[..., :r, :c].float().contiguous()
        check_finite(q, plan.where(key), True)
        check_finite(s, plan.where(key + SCALE_SUFFIX), True)
        plan.reader.release(key)
        plan.reader.release(key + SCALE_SUFFIX)
        return q, s
    return fp8
