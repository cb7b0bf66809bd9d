"""Training checkpoints: everything needed to continue a run exactly, written atomically.

Layout of OUT/checkpoints/step_00000120/:
    model.pt         full model state dict (fp32 master weights, the balancing biases included)
    optimizer.pt     {"state": {param name: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]}
    scheduler.pt     the LR scheduler's state dict
    rng_rank{r}.pt   python / torch / CUDA RNG states of rank r
    trainer.json     step, data position, data fingerprint, configs, expert-load totals

A checkpoint is written into `.step_XXXXXXXX.tmp` and renamed when complete, so a killed run leaves
either the whole checkpoint or none; stale temporary directories are removed on the next save.
State dicts are full (gathered on rank 0), so a run can resume on a different number of ranks.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from ..checkpoint.files import fsync_dir
from ..distributed.context import ParallelContext
from ..distributed.training import full_tensor, load_full_, parameter_name

STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "trainer.json").exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict (collective under FSDP / expert parallelism)."""
    return {k: full_tensor(v) for k, v in model.state_dict().items()}


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} model tensors, e.g. {missing[:3]}")
    with torch.no_grad():
        for k, target in own.items():
            if tuple(state[k].shape) != tuple(target.shape):
                raise ValueError(f"checkpoint tensor {k} has shape {tuple(state[k].shape)}, "
                                 f"the model expects {tuple(target.shape)}")
            load_full_(target, state[k])


def optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter name, tensors whole (collective)."""
    names = {id(p): parameter_name(n) for n, p in model.named_parameters()}
    state = {}
    for group in opt.param_groups:
        for p in group["params"]:
            if p in opt.state:
                state[names[id(p)]] = {k: full_tensor(v) if torch.is_tensor(v) and v.dim() else
                                       (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                                       for k, v in opt.state[p].items()}
    groups = [{k: v for k, v in g.items() if k != "params"} | {"names": [names[id(p)] for p in g["params"]]}
              for g in opt.param_groups]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, saved: dict) -> None:
    params = {parameter_name(n): p for n, p in model.named_parameters()}
    if len(saved["param_groups"]) != len(opt.param_groups):
        raise ValueError("the checkpoint's optimizer has a different number of parameter groups")
    for group, sg in zip(opt.param_groups, saved["param_groups"]):
        for k, v in sg.items():
            if k not in ("names", "params"):
                group[k] = v
    for name, st in saved["state"].items():
        if name not in params:
            raise KeyError(f"checkpoint has optimizer state for unknown parameter {name}")
        p = params[name]
        new = {}
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim():
                t = torch.zeros_like(p, dtype=v.dtype)
                load_full_(t, v)
                new[k] = t
            else:
                new[k] = v.clone() if torch.is_tensor(v) else v
        opt.state[p] = new


def rng_state() -> dict:
    out = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str | Path, step: int, model, optimizer, scheduler, meta: dict,
                    ctx: ParallelContext, keep: int = 2) -> Path | None:
    """Write checkpoint `step` under root atomically; keep the newest `keep` (0 = all). Collective."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    ctx.barrier()
    _save(rng_state(), tmp / f"rng_rank{ctx.rank}.pt")
    msd = model_state(model)
    osd = optimizer_state(model, optimizer)
    if ctx.is_main:
        _save(msd, tmp / "model.pt")
        _save(osd, tmp / "optimizer.pt")
        _save(scheduler.state_dict(), tmp / "scheduler.pt")
        with open(tmp / "trainer.json", "w") as f:
            json.dump({"step": step, **meta}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    del msd, osd
    ctx.barrier()
    if ctx.is_main:
        fsync_dir(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        if keep > 0:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    ctx.barrier()
    return final


def load_checkpoint(path: str | Path, model, optimizer, scheduler, ctx: ParallelContext) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from `path`; returns trainer.json."""
    path = Path(path)
    try:
        meta = json.loads((path / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a training checkpoint ({e})") from None
    load_model_state(model, torch.load(path / "model.pt", map_location="cpu", weights_only=True))
    load_optimizer_state(model, optimizer, torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = path / f"rng_rank{ctx.rank}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=False))
    return meta
