"""Where this process stands in a distributed run: ParallelContext and init_distributed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class ParallelContext:
    """Where this process stands. Single-process training uses the default (world 1)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    ep: int = 1
    mesh: object = None  # DeviceMesh over all ranks (FSDP)
    ep_mesh: object = None  # 2-D DeviceMesh ("edp", "ep")

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

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over all ranks, in place."""
        if self.distributed:
            dist.all_reduce(t)
        return t


def init_distributed(ep: int = 1, device: str | None = None) -> ParallelContext:
    """Join the process group torchrun (or the caller) set up through RANK / WORLD_SIZE / MASTER_ADDR
    (torch.distributed's own launch protocol: the one place below the CLI that reads the environment).

    Without WORLD_SIZE > 1 this is single-process training on `device` (default: cuda if present).
    NCCL on GPUs (one per local rank), gloo on CPUs.
    """
    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if ep != 1:
            raise ValueError(f"expert parallelism (ep={ep}) needs several processes; launch with torchrun")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return ParallelContext(device=dev)
    if ep < 1 or world % ep:
        raise ValueError(f"ep={ep} must divide the number of processes ({world})")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
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
    return ParallelContext(rank=rank, world=world, device=dev, ep=ep, mesh=mesh, ep_mesh=ep_mesh)
