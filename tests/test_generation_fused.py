"""Decode-speed paths of the generation engine: fused q/k/v and gate/up projections, and the speculative
step run as one captured step (CPU here: the same code, without CUDA graphs)."""

from __future__ import annotations

import pytest
import torch

from conftest import graph_runner_on_cpu, tiny_model
from mimo_flash.generation import generate
from mimo_flash.generation import speculative as spec_mod
from mimo_flash.generation.runner import fused_projections, prepare_fused
from mimo_flash.model.attention import Attention
from mimo_flash.model.layers import MLP


@pytest.mark.parametrize("reduce", [False, True])
def test_fused_projections_match_the_modules(reduce):
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids, mtp=True)
        assert prepare_fused(model)
        with fused_projections(model, reduce=reduce):
            out = model(ids, mtp=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(out.mtp_logits, ref.mtp_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the fused copies leave parameters, their names and the state dict alone
    names = {n for n, _ in model.named_parameters()}
    assert not any("_mf_fused" in n for n in names) and set(model.state_dict()) >= names
    for m in model.modules():
        if isinstance(m, Attention):
            assert m.q_proj.weight.data_ptr() != m._mf_fused[1].data_ptr()
    assert not any(isinstance(m, (Attention, MLP)) and "forward" in m.__dict__ for m in model.modules())


def test_fused_weights_follow_weight_updates():
    model = tiny_model()
    assert prepare_fused(model)
    assert not prepare_fused(model)  # nothing changed: nothing rebuilt
    attn = model.model.layers[1].self_attn
    with torch.no_grad():
        attn.k_proj.weight.add_(1.0)  # in place (an optimizer step, a load_state_dict)
    assert prepare_fused(model)
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], 0)
    assert torch.equal(attn._mf_fused[1], w)
    mlp = model.model.layers[0].mlp
    mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight * 2)  # replaced
    assert prepare_fused(model)
    assert torch.equal(mlp._mf_fused[1], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0))


@pytest.mark.parametrize("K", [1, 3])
def test_whole_step_speculative_equals_plain(monkeypatch, K):
    model = tiny_model(vocab_size=6)
    ids = torch.randint(0, 6, (3, 12), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :10] = 0
    kw = dict(attention_mask=mask, max_new_tokens=30)
    plain = generate(model, ids, **kw)
    eos_plain = generate(model, ids, eos_token_id=3, pad_token_id=5, **kw)
    made = graph_runner_on_cpu(monkeypatch)
    calls = []
    real = spec_mod._graphed_step

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(spec_mod, "_graphed_step", counted)
    out, stats = generate(model, ids, num_speculative_tokens=K, return_stats=True, **kw)
    assert torch.equal(out, plain)
    assert stats.accepted > 0 and len(calls) == stats.steps - 1  # every step after the first
    assert not made[-1].notes and not getattr(made[-1], "spec_graph_failed", None)
    # rows that finish early (EOS) are frozen inside the step
    assert torch.equal(generate(model, ids, num_speculative_tokens=K, eos_token_id=3, pad_token_id=5, **kw),
                       eos_plain)
    # the step-by-step path gives the same tokens
    monkeypatch.setattr(spec_mod, "SPEC_GRAPH", False)
    n = len(calls)
    assert torch.equal(generate(model, ids, num_speculative_tokens=K, **kw), plain)
    assert len(calls) == n


def test_whole_step_falls_back_when_it_fails(monkeypatch):
    model = tiny_model(vocab_size=6)
    ids = torch.randint(0, 6, (1, 9), generator=torch.Generator().manual_seed(8))
    plain = generate(model, ids, max_new_tokens=20)
    made = graph_runner_on_cpu(monkeypatch)

    def broken(*a, **k):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(spec_mod, "_graphed_step", broken)
    with pytest.warns(UserWarning, match="step-by-step"):
        out = generate(model, ids, max_new_tokens=20, num_speculative_tokens=2)
    assert torch.equal(out, plain)
    assert "capture failed" in made[-1].spec_graph_failed


def test_fused_path_falls_back_when_tracing_fails(monkeypatch):
    model = tiny_model(vocab_size=6)
    ids = torch.randint(0, 6, (1, 9), generator=torch.Generator().manual_seed(9))
    plain = generate(model, ids, max_new_tokens=10)
    made = graph_runner_on_cpu(monkeypatch)
    from mimo_flash.generation import runner as runner_mod

    def broken(reduce):
        def forward(self, *a, **k):
            raise RuntimeError("fused path broke")
        return forward

    monkeypatch.setattr(runner_mod, "_attention_fused_forward", broken)
    with pytest.warns(UserWarning, match="fused projections failed"):
        out = generate(model, ids, max_new_tokens=10)
    assert torch.equal(out, plain)
    assert not made[-1].fuse and made[-1].notes
