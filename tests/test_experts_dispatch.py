"""Experts hold a dispatcher (local by default): under autocast a plain forward (no Trainer) computes the
experts in autocast's dtype, with gradients reaching the fp32 weights; a dispatcher set from outside
takes over the expert compute."""

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
