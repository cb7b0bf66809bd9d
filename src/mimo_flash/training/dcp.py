"""Training checkpoints with torch.distributed.checkpoint: every rank writes its own shards.

    root/step-00000120/        one complete checkpoint: DCP's files (.metadata, __<rank>_<n>.distcp),
                               extra.json (the caller's small JSON state: step, data position, ...) and
                               rank-<r>.pt (each rank's own small state, e.g. its RNG; optional)
    root/.step-00000120.tmp/   being written; renamed to step-00000120 by rank 0 once every rank is done

A step directory is therefore complete or absent: a save killed midway leaves only a hidden .tmp directory,
which `latest` ignores and the next save of that step removes. The state is gathered with
torch.distributed.checkpoint.state_dict.get_state_dict (FSDP2 DTensors stay sharded: no rank holds the whole
model) and loading goes through set_state_dict, so a checkpoint saved on N ranks loads on M ranks or into an
unsharded model (DCP reshards on read).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..checkpoint.files import fsync_dir

_STEP = re.compile(r"^step-(\d{8})$")


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def latest(root: str | os.PathLike) -> int | None:
    """The newest complete step under root, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = [int(m.group(1)) for p in root.iterdir() if (m := _STEP.match(p.name)) and (p / ".metadata").exists()]
    return max(steps) if steps else None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_tree(d: Path) -> None:
    for f in d.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(d)


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """{"model": ..., "optim": ...} as DCP saves and fills it (FSDP2 shards stay sharded); no "optim" without
    an optimizer."""
    msd, osd = get_state_dict(model, optimizer if optimizer is not None else [])
    return {"model": msd} if optimizer is None else {"model": msd, "optim": osd}


def save(root: str | os.PathLike, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
         extra: dict | None = None, rank_state=None, keep: int = 0) -> Path:
    """Write step `step` of model (+ optimizer) under root; every rank calls it. -> the step directory.

    extra: a JSON-serialisable dict (rank 0's is written). rank_state: anything torch.save takes, written by
    every rank for itself (read back with `load_rank_state`). An existing step directory is replaced.
    keep > 0: afterwards only the newest `keep` complete steps stay.
    """
    root = Path(root)
    final, tmp = step_dir(root, step), root / f".step-{step:08d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # a save of this step that was killed
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    state = _state(model, optimizer)
    dcp.save(state, checkpoint_id=tmp)
    if rank_state is not None:
        with open(tmp / f"rank-{_rank()}.pt", "wb") as f:
            torch.save(rank_state, f)
    if _rank() == 0:
        with open(tmp / "extra.json", "w") as f:
            json.dump({"step": step, **(extra or {})}, f, indent=2)
    _barrier()  # every rank's shards are on disk
    if _rank() == 0:
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        if keep > 0:
            done = sorted(int(m.group(1)) for p in root.iterdir() if (m := _STEP.match(p.name)))
            for old in done[:-keep]:
                shutil.rmtree(step_dir(root, old), ignore_errors=True)
    _barrier()
    return final


def load_rank_state(root: str | os.PathLike, step: int, rank: int | None = None):
    """What rank `rank` (default: this one) saved as rank_state at step `step`; None when it saved none."""
    f = step_dir(root, step) / f"rank-{_rank() if rank is None else rank}.pt"
    return torch.load(f, weights_only=False) if f.exists() else None


def load(root: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
         step: int | None = None) -> dict:
    """Fill model (+ optimizer) in place from step `step` (default: the newest complete one) under root,
    resharding to however the model is sharded now. Every rank calls it. -> the extra dict (with "step")."""
    step = latest(root) if step is None else step
    if step is None:
        raise FileNotFoundError(f"{root}: no complete checkpoint (step-XXXXXXXX directories)")
    d = step_dir(root, step)
    if not (d / ".metadata").exists():
        raise FileNotFoundError(f"{d}: not a complete checkpoint (no .metadata)")
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=d)
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    return json.loads((d / "extra.json").read_text())


def export_step(step_path: str | os.PathLike, dst: str | os.PathLike, dtype=None, fp8: bool = False,
                max_shard_size: int | str = "5GB") -> dict | None:
    """A training checkpoint's step directory -> the hub format at dst (training.sharded_export). Under torchrun
    the model is sharded with FSDP2 over the ranks (each rank reads its shards); in one process it is whole.
    The model config is the one the run saved (extra.json). Every rank calls; -> rank 0's summary."""
    from ..config import MiMoConfig
    from ..distributed.context import ParallelContext
    from ..distributed.training import apply_fsdp
    from ..model import MiMoForCausalLM
    from .sharded_export import export_sharded

    step_path = Path(step_path)
    if not (step_path / ".metadata").exists() or not (step_path / "extra.json").exists():
        raise FileNotFoundError(f"{step_path}: not a complete training checkpoint (.metadata and extra.json)")
    extra = json.loads((step_path / "extra.json").read_text())
    if "model_config" not in extra:
        raise ValueError(f"{step_path / 'extra.json'}: no model_config (not written by the Trainer)")
    config = MiMoConfig.from_dict(extra["model_config"])
    with torch.device("meta"):
        model = MiMoForCausalLM(config)
    if dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.device_mesh import init_device_mesh

        world, dev = dist.get_world_size(), torch.device("cpu")
        ctx = ParallelContext(rank=_rank(), world=world, device=dev,
                              mesh=init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",)))
        apply_fsdp(model, ctx, [])
    model.to_empty(device="cpu")
    load(step_path.parent, model, step=int(step_path.name.removeprefix("step-")))
    return export_sharded(model, dst, dtype=dtype or config.torch_dtype, fp8=fp8, max_shard_size=max_shard_size)


def rng_state() -> dict:
    """This process's python, torch and CUDA RNG states (for a rank_state)."""
    out = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
