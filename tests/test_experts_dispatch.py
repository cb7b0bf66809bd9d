"""Experts hold a dispatcher (local by default): under autocast a plain forward (no Trainer) computes the
experts in autocast's dtype, with gradients reaching the fp32 weights; a dispatcher set from outside
takes over the expert compute; with expert parallelism a rank whose experts receive no token still joins
the backward's all-to-alls."""

from __future__ import annotations

import torch

from conftest import tiny_model
from mimo_flash.model.moe import Experts, LocalDispatcher


def test_plain_autocast_forward_runs_the_experts_in_bf16():
    model = tiny_model(seed=2).train()
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert experts and all(isinstance(m.dispatcher, LocalDispatcher) for m in experts)
    seen = []
    for m in experts:
        m.register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, out.dtype)))
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert len(seen) == len(experts)
    assert all(o == torch.bfloat16 for _, o in seen), seen  # the compute ran in bf16 whatever came in
    for m in experts:
        assert m.gate_up_proj.dtype == torch.float32 and m.gate_up_proj.grad.dtype == torch.float32
        assert m.gate_up_proj.grad.abs().sum() > 0 and m.down_proj.grad.abs().sum() > 0
    # without autocast nothing is cast: fp32 in, fp32 out
    seen.clear()
    model(ids)
    assert all(i == o == torch.float32 for i, o in seen)


class _Doubling:
    """A dispatcher that runs the local experts and doubles their output (to see that it is the one used)."""

    def __init__(self):
        self.calls = 0
        self.local = LocalDispatcher()

    def __call__(self, x, idx, w, gate_up, down, backend):
        self.calls += 1
        return 2 * self.local(x, idx, w, gate_up, down, backend)


def test_the_module_uses_the_dispatcher_it_holds():
    model = tiny_model(seed=3)
    m = next(x for x in model.modules() if isinstance(x, Experts))
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([[0, 1], [2, 3], [1, 7], [4, 4 + 1], [6, 0]])
    w = torch.rand(5, 2, generator=torch.Generator().manual_seed(2))
    plain = m(x, idx, w)
    m.dispatcher = _Doubling()
    torch.testing.assert_close(m(x, idx, w), 2 * plain)
    assert m.dispatcher.calls == 1


def _nothing_for_rank_zero(rank: int, world: int) -> dict:
    """Expert parallelism over 2 gloo ranks, every (token, slot) pair of both ranks routed to rank 1's experts."""
    import torch.distributed as dist
    import torch.nn as nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from mimo_flash.distributed.experts import AllToAllDispatcher
    from mimo_flash.ops.moe import experts_reference

    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    E, D, I, N = 4, 8, 6, 5
    g = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g)
    x = torch.randn(world, N, D, generator=g)[rank].clone().requires_grad_()
    w = torch.rand(world, N, 2, generator=g)[rank]
    idx = torch.tensor([[2, 3]] * N)  # experts 2 and 3 live on rank 1
    El = E // world
    shard = lambda t: nn.Parameter(DTensor.from_local(t[rank * El:(rank + 1) * El].clone(), mesh, [Shard(0)],  # noqa: E731
                                                      run_check=False))
    gu, dn = shard(gate_up), shard(down)
    y = AllToAllDispatcher(mesh.get_group(), E)(x, idx, w, gu, dn, "auto")
    y.square().sum().backward()  # hangs if one rank skips the backward's all-to-alls
    xr = x.detach().clone().requires_grad_()
    ref = experts_reference(xr, idx, w, gate_up, down)
    ref.square().sum().backward()
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    return {"y": rel(y, ref), "x_grad": rel(x.grad, xr.grad),
            "gate_up_grad": None if gu.grad is None else gu.grad.to_local().abs().sum().item(),
            "down_grad": None if dn.grad is None else dn.grad.to_local().abs().sum().item()}


def test_expert_parallel_rank_that_receives_nothing_still_joins_the_backward():
    """A rank none of whose experts is chosen still runs the backward's all-to-alls (else the ranks hang) and its
    expert shards get zero gradients, not none (their data-parallel all-reduce runs on every copy)."""
    from harness import run_ranks

    r0, r1 = run_ranks(_nothing_for_rank_zero, 2, timeout=90)
    for r in (r0, r1):
        assert r["y"] < 1e-5 and r["x_grad"] < 1e-5, r  # the same numbers as all experts in one process
    assert r0["gate_up_grad"] == 0.0 and r0["down_grad"] == 0.0
    assert r1["gate_up_grad"] > 0 and r1["down_grad"] > 0
