"""Keeping the ranks of a tensor / expert parallel model in step when only rank 0 talks to the world.

Rank 0 runs the CLI's prompt loop or the HTTP server and its scheduler; the other ranks must run the same
forward passes, since every layer ends in a collective. `StepBroadcaster` does that with one message per
step: rank 0 calls `step(*args, **kwargs)`, which sends the arguments (picklable: token lists, sampling
parameters, CPU tensors) to every rank, then runs the step function itself; every other rank sits in
`follow()`, which receives each step's arguments and runs the same function with them, until rank 0 calls
`stop()`. The step function must be deterministic given its arguments (a sampling seed is an argument:
rank 0 draws one before sending when the caller gave none) so that all ranks take the same path.

A scheduler uses it by making its per-step work one function of what it decided (which requests, their new
token ids and cache slots, their sampling parameters), called through `step` on rank 0 and run by `follow`
everywhere else. The message is a host-side broadcast before the step, outside any CUDA graph.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist


class StepBroadcaster:
    """fn: the step every rank runs; group: the ranks that run it (default: all); src: the rank that leads."""

    def __init__(self, fn: Callable[..., Any], group=None, src: int = 0) -> None:
        self.fn, self.group, self.src = fn, group, src
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1

    @property
    def leader(self) -> bool:
        return self.rank == self.src

    def _send(self, message) -> None:
        if self.world > 1:
            dist.broadcast_object_list([message], src=self.src, group=self.group)

    def announce(self, *args, **kwargs) -> None:
        """On the leader: send this step's arguments to the followers (the leader then runs the step its own
        way, e.g. with a streaming callback the followers do not have)."""
        if not self.leader:
            raise RuntimeError(f"StepBroadcaster.announce runs on rank {self.src}; rank {self.rank} follows")
        self._send((args, kwargs))

    def step(self, *args, **kwargs) -> Any:
        """On the leader: send this step's arguments to the followers, then run it here."""
        if not self.leader:
            raise RuntimeError(f"StepBroadcaster.step runs on rank {self.src}; rank {self.rank} follows")
        self._send((args, kwargs))
        return self.fn(*args, **kwargs)

    def follow(self) -> int:
        """On a follower: run every step the leader sends, until it stops. Returns the number of steps."""
        if self.leader:
            raise RuntimeError(f"rank {self.rank} leads: it calls step(), not follow()")
        n = 0
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=self.src, group=self.group)
            if box[0] is None:
                return n
            args, kwargs = box[0]
            self.fn(*args, **kwargs)
            n += 1

    def stop(self) -> None:
        """On the leader: release the followers from follow(). Followers already gone (a Ctrl-C reaches every
        process torchrun started) are not an error at shutdown."""
        if self.leader:
            try:
                self._send(None)
            except RuntimeError:  # gloo / NCCL: the peer closed the connection
                pass
