"""Open a checkpoint: find its files, check them, and read its config.

Accepted: a directory or a file; one safetensors file, several, or shards listed by an index
(`model.safetensors.index.json`); pickle files (.bin/.pt) only when the caller opts in, and then
through torch.load(weights_only=True). open_checkpoint also takes a checkpoint source object (one with
open_reader(), e.g. checkpoint.synthetic.SyntheticCheckpoint) whose reader serves the same interface:
keys / info / infos / get / release / close, config(), config_path, describe().
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config import MiMoConfig
from .errors import CheckpointError
from .files import SafetensorsFile, TensorInfo

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
DEFAULT_BLOCK = (128, 128)


class PickleFile:
    """A torch.save'd state dict, loaded with weights_only=True (memory-mapped where possible)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
        except Exception as e:  # noqa: BLE001 - any failure to unpickle is a bad file
            raise CheckpointError(f"{path}: cannot be loaded with torch.load(weights_only=True): "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("state_dict", "model"):
            state = next(iter(state.values()))
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
        self.tensors = state
        self.infos = {k: TensorInfo(k, path, t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())
                      for k, t in state.items()}

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def release(self, name: str) -> None:
        pass

    def close(self) -> None:
        self.tensors = {}


class TensorIndex:
    """What every checkpoint reader shares: `infos` {name: TensorInfo} and the lookups over it; a context
    manager that calls close(). Subclasses fill infos and define get / release / close."""

    infos: dict[str, TensorInfo]

    def keys(self) -> set[str]:
        return set(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def info(self, name: str) -> TensorInfo:
        return self.infos[name]

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CheckpointReader(TensorIndex):
    """Tensor name -> file over a checkpoint's files; headers checked on open, tensors read lazily.

    get(name) returns a view valid until release(name) / close(); copy what you keep.
    """

    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False) -> None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or directory")
        self.root = p if p.is_dir() else p.parent
        files, index, self.index_path = _find_files(p)
        pickles = [f for f in files if f.suffix in PICKLE_SUFFIXES]
        if pickles and not allow_pickle:
            raise CheckpointError(f"{pickles[0]}: pickle checkpoints can run arbitrary code when loaded, so they are "
                                  "refused; convert it to safetensors, or if you trust it pass allow_pickle=True "
                                  "(--allow-pickle), which loads it with torch.load(weights_only=True)")
        self.files = {f: (PickleFile(f) if f.suffix in PICKLE_SUFFIXES else SafetensorsFile(f)) for f in files}
        self.infos: dict[str, TensorInfo] = {}
        if index is not None:
            for name, f in index.items():
                infos = self.files[f].infos
                if name not in infos:
                    raise CheckpointError(f"{self.index_path}: lists tensor {name} in {f.name}, "
                                          f"but {f.name} has no such tensor")
                self.infos[name] = infos[name]
        else:
            for fh in self.files.values():
                for name, info in fh.infos.items():
                    if name in self.infos:
                        raise CheckpointError(f"tensor {name} is in both {self.infos[name].file} and {info.file}")
                    self.infos[name] = info

    def config(self) -> tuple[dict, MiMoConfig]:
        """config.json -> (the raw dict, MiMoConfig)."""
        return read_config(self.root)

    @property
    def config_path(self) -> str:
        """Where the config comes from, for messages."""
        return str(self.root / "config.json")

    def describe(self) -> str:
        """The checkpoint, for messages: its index, its one file, or its directory."""
        return str(self.index_path or (next(iter(self.files)) if len(self.files) == 1 else self.root))

    def get(self, name: str) -> torch.Tensor:
        return self.files[self.infos[name].file].get(name)

    def release(self, name: str) -> None:
        self.files[self.infos[name].file].release(name)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def open_checkpoint(path, allow_pickle: bool = False):
    """A reader over `path`: a CheckpointReader for a checkpoint directory or file, or, for a checkpoint source
    object (one with open_reader(): checkpoint.synthetic.SyntheticCheckpoint), the reader it opens."""
    opener = getattr(path, "open_reader", None)
    if callable(opener):
        return opener()
    return CheckpointReader(path, allow_pickle=allow_pickle)


def _find_files(p: Path) -> tuple[list[Path], dict[str, Path] | None, Path | None]:
    """The checkpoint files at `p`; if an index lists them, its name -> file map and its path."""
    if p.is_file():
        if p.name.endswith(".index.json"):
            return _read_index(p)
        if p.suffix == ".safetensors" or p.suffix in PICKLE_SUFFIXES:
            return [p], None, None
        raise CheckpointError(f"{p}: not a checkpoint file (expected .safetensors, an .index.json, or .bin/.pt)")
    for name in INDEX_NAMES[:1]:
        if (p / name).is_file():
            return _read_index(p / name)
    if (p / "model.safetensors").is_file():
        return [p / "model.safetensors"], None, None
    found = sorted(p.glob("*.safetensors"))
    if found:
        return found, None, None
    if (p / INDEX_NAMES[1]).is_file():
        return _read_index(p / INDEX_NAMES[1])
    found = sorted(f for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES and f.is_file())
    if found:
        return found, None, None
    raise FileNotFoundError(f"{p}: no checkpoint here (no model.safetensors, model.safetensors.index.json, "
                            "*.safetensors or pickle files)")


def _read_index(index: Path) -> tuple[list[Path], dict[str, Path], Path]:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: not a readable JSON index ({e})") from None
    except (KeyError, TypeError):
        raise CheckpointError(f"{index}: expected {{\"weight_map\": {{tensor name: file name}}}}") from None
    where = {k: index.parent / v for k, v in weight_map.items()}
    files = sorted(set(where.values()))
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{index}: names shard {f.name}, which does not exist in {index.parent}")
    return files, where, index


def read_config(root: str | os.PathLike) -> tuple[dict, MiMoConfig]:
    """`config.json` of a checkpoint directory -> (the raw dict, MiMoConfig)."""
    f = Path(root) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{Path(root)}: no config.json (a checkpoint directory needs one)")
    try:
        raw = json.loads(f.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{f}: expected a JSON object")
    try:
        config = MiMoConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{f}: {e}") from None
    return raw, config


def block_size(raw: dict, where: str) -> tuple[int, int] | None:
    """The FP8 block size named by a config's quantization_config (None when not quantized)."""
    q = raw.get("quantization_config")
    if not q:
        return None
    if not isinstance(q, dict):
        raise CheckpointError(f"{where}: quantization_config must be an object")
    method = q.get("quant_method", "fp8")
    if method != "fp8":
        raise CheckpointError(f"{where}: quantization method {method!r} is not supported (only block FP8)")
    if q.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"{where}: FP8 format {q.get('fmt')!r} is not supported (only e4m3)")
    b = q.get("weight_block_size", list(DEFAULT_BLOCK))
    if (not isinstance(b, (list, tuple)) or len(b) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in b)):
        raise CheckpointError(f"{where}: quantization_config.weight_block_size must be two positive integers, got {b!r}")
    return int(b[0]), int(b[1])
