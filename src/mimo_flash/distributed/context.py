"""Where this process stands in a distributed run: ParallelContext and init_distributed."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


def default_device() -> torch.device:
    """Where a run that names no device goes: the GPU where there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class ParallelContext:
    """Where this process stands. Single-process training uses the default (world 1, on default_device())."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=default_device)
    ep: int = 1
    mesh: object = None  # DeviceMesh over all ranks (FSDP)
    ep_mesh: object = None  # 2-D DeviceMesh ("edp", "ep")
    cp: int = 1  # context-parallel size: consecutive ranks r * cp .. r * cp + cp - 1 split each row
    cp_mesh: object = None  # 2-D DeviceMesh ("dp", "cp"); set: the Trainer takes the context-parallel path

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_group(self):
        return self.ep_mesh.get_group("ep") if self.ep_mesh is not None else None

    @property
    def edp_group(self):
        return self.ep_mesh.get_group("edp") if self.ep_mesh is not None and self.world // self.ep > 1 else None

    @property
    def cp_group(self):
        return self.cp_mesh.get_group("cp") if self.cp_mesh is not None else None

    @property
    def dp_rank(self) -> int:
        """Which data-parallel rank this is: the ranks of one CP group read the same rows."""
        return self.rank // self.cp

    @property
    def dp_world(self) -> int:
        return self.world // self.cp

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over all ranks, in place."""
        if self.distributed:
            dist.all_reduce(t)
        return t


def init_distributed(ep: int = 1, device: str | None = None, cp: int = 1) -> ParallelContext:
    """Join the process group torchrun (or the caller) set up through RANK / WORLD_SIZE / MASTER_ADDR
    (torch.distributed's own launch protocol: the one place below the CLI that reads the environment).

    Without WORLD_SIZE > 1 this is single-process training on `device` (default: cuda if present).
    NCCL on GPUs (one per local rank), gloo on CPUs. cp > 1: context parallelism over groups of cp consecutive
    ranks (FSDP2 still shards over all ranks; expert parallelism over ep ranks as without it).
    """
    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if ep != 1 or cp != 1:
            raise ValueError(f"expert parallelism (ep={ep}) and context parallelism (cp={cp}) need several "
                             "processes; launch with torchrun")
        return ParallelContext(device=torch.device(device) if device else default_device())
    if ep < 1 or world % ep:
        raise ValueError(f"ep={ep} must divide the number of processes ({world})")
    if cp < 1 or world % cp:
        raise ValueError(f"cp={cp} must divide the number of processes ({world})")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = (torch.device(device) if device else default_device()).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=10),
                                **({"device_id": dev} if use_cuda else {}))
    mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    ep_mesh = init_device_mesh(dev.type, (world // ep, ep), mesh_dim_names=("edp", "ep")) if ep > 1 else None
    cp_mesh = init_device_mesh(dev.type, (world // cp, cp), mesh_dim_names=("dp", "cp")) if cp > 1 else None
    return ParallelContext(rank=rank, world=world, device=dev, ep=ep, mesh=mesh, ep_mesh=ep_mesh, cp=cp,
                           cp_mesh=cp_mesh)


def leave_distributed(ok: bool = True) -> None:
    """Leave the process group (and every group made from it) before the process exits: after a barrier when
    this rank finished normally, so that no rank tears its connections down while a peer's last collectives
    are still in flight (gloo answers that with an abort, seen as SIGABRT at exit); at once when it failed (a
    peer may never reach the barrier). Nothing when no group is up."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if ok:
        dist.barrier()
    dist.destroy_process_group()
