"""Read and write hub-format safetensors checkpoints (unquantized).

Loading builds the model on the meta device and fills it tensor by tensor from memory-mapped
safetensors files, so the whole state dict never sits in memory twice. Saving writes into a
temporary directory that replaces the target only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import MiMoConfig
from .names import hub_parts, is_mtp, to_hub, transformers_name

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / 1234 -> bytes."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


class CheckpointReader:
    """Tensor name -> file over one safetensors file or an index of shards; tensors read lazily."""

    def __init__(self, path: str | os.PathLike) -> None:
        p = Path(path)
        self.root = p if p.is_dir() else p.parent
        index = self.root / "model.safetensors.index.json"
        if p.is_file():
            files = [p]
            self.where = None
        elif index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {k: self.root / f for k, f in weight_map.items()}
            files = sorted(set(self.where.values()))
        elif (self.root / "model.safetensors").exists():
            files = [self.root / "model.safetensors"]
            self.where = None
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {self.root}")
        self._handles = {}
        if self.where is None:
            self.where = {}
            for f in files:
                for k in self._open(f).keys():
                    self.where[k] = f

    def _open(self, f: Path):
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), framework="pt")
        return self._handles[f]

    def keys(self) -> set[str]:
        return set(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        return self._open(self.where[key]).get_tensor(key)


def load_pretrained(path, dtype=None, device=None, load_mtp: bool = True, strict: bool = True):
    """Build MiMoForCausalLM from a checkpoint directory (hub or transformers layout)."""
    from ..model import MiMoForCausalLM

    config = MiMoConfig.from_pretrained(path)
    if not load_mtp:
        config = config.replace(num_nextn_predict_layers=0)
    dtype = parse_dtype(dtype if dtype is not None else config.torch_dtype)
    reader = CheckpointReader(path)
    with torch.device("meta"):
        model = MiMoForCausalLM(config)
    model.to_empty(device=device or "cpu")
    model.to(dtype)
    used: set[str] = set()
    missing: list[str] = []
    state = model.state_dict()
    with torch.no_grad():
        for name, target in state.items():
            for key, index in hub_parts(name, target.shape):
                src = key if key in reader else transformers_name(key)
                if src not in reader:
                    missing.append(key)
                    continue
                t = reader.get(src)
                dst = target if index is None else target[index]
                if tuple(t.shape) != tuple(dst.shape):
                    raise ValueError(f"{reader.where[src]}: tensor {src} has shape {tuple(t.shape)}, "
                                     f"the config expects {tuple(dst.shape)}")
                dst.copy_(t)
                used.add(src)
    if missing:
        raise KeyError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    unexpected = sorted(k for k in reader.keys() - used if load_mtp or not is_mtp(k))
    if unexpected and strict:
        raise KeyError(f"{path}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    return model


def save_pretrained(model, path, dtype=None, max_shard_size: int | str = "5GB") -> None:
    """Write config.json and hub-named safetensors shards (with an index when more than one)."""
    path = Path(path)
    limit = parse_size(max_shard_size)
    cast = parse_dtype(dtype) if dtype is not None else None
    config = model.config
    if cast is not None:
        config = config.replace(torch_dtype=str(cast).removeprefix("torch."))
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.tmp-"))
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key, t in to_hub(model.state_dict()):
            t = t.detach()
            if cast is not None and t.is_floating_point() and not ("mlp.gate." in key):
                t = t.to(cast)
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > limit:
                shards.append({})
                size = 0
            shards[-1][key] = t.to("cpu").contiguous().clone()
            size += nbytes
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map = {}
        total = 0
        for name, shard in zip(names, shards):
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            for k, t in shard.items():
                weight_map[k] = name
                total += t.numel() * t.element_size()
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config.save_pretrained(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished directory into place; an older one at `path` is removed only afterwards."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
