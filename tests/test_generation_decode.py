"""Decode-speed paths of the generation engine, on the CPU: the ops' decode backends against their reference
ops, the compiled decode steps against the eager ones, and the captured steps (greedy chunks, whole speculative
steps) with their fallbacks. On a CPU, generate(cuda_graphs=True) builds the GraphRunner that CUDA uses and runs
its graph-shaped steps directly (compile=True: compiled, no graphs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import run_in_triton_interpreter, tiny_model
from mimo_flash.generation import KVCache, generate
from mimo_flash.generation import speculative as spec_mod
from mimo_flash.generation.engine import prefill
from mimo_flash.generation.runner import GraphRunner, Runner
from mimo_flash.model.layers import Linear
from mimo_flash.ops import moe as moe_ops
from mimo_flash.ops.linear import linear
from mimo_flash.options import override


# ------------------------------------------------------------------ decode backends vs their reference ops
@pytest.mark.parametrize("N", [1, 3, 33])
def test_router_decode_backend_equals_route(N):
    g = torch.Generator().manual_seed(14 + N)
    E, D, k = 16, 24, 4
    weight, bias = torch.randn(E, D, generator=g) * 0.5, torch.randn(E, generator=g) * 0.05
    x = torch.randn(N, D, generator=g)
    for norm, scaling in ((True, 2.5), (False, 1.0)):
        ref_idx, ref_w, _ = moe_ops.route(x, weight, bias, k, 1, 1, norm, scaling)
        want = torch.zeros(N, E).scatter(1, ref_idx, ref_w)  # the selection as a dense [N, E] map (order-free)
        with override(router="decode"):
            idx, w, counts = moe_ops.router(x, weight, bias, k, 1, 1, norm, scaling, count=True)
        torch.testing.assert_close(torch.zeros(N, E).scatter(1, idx, w), want, rtol=1e-6, atol=1e-6)
        assert torch.equal(counts, torch.bincount(ref_idx.reshape(-1), minlength=E))
    with override(router="decode"):  # grouped routing has no decode form: the op keeps route()'s
        idx, w, _ = moe_ops.router(x, weight, bias, k, 4, 2, True, 1.0)
    ref_idx, ref_w, _ = moe_ops.route(x, weight, bias, k, 4, 2, True, 1.0)
    assert torch.equal(torch.zeros(N, E).scatter(1, idx, w), torch.zeros(N, E).scatter(1, ref_idx, ref_w))


@pytest.mark.parametrize("N", [1, 2, 16])  # gather path (N * k <= E / 2) and the all-experts path
def test_experts_decode_backend_equals_reference(N):
    g = torch.Generator().manual_seed(4 + N)
    E, D, I, k = 8, 16, 16, 2  # (rows of 16-byte multiples: what torch._grouped_mm takes)
    gate_up, down = torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g)
    x = torch.randn(N, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    w = torch.rand(N, k, generator=g)
    want = moe_ops.experts_reference(x, idx, w, gate_up, down)
    with override(experts="decode"):  # a module's "auto" defers to the option
        got = moe_ops.experts(x, idx, w, gate_up, down, "auto")
        fixed = moe_ops.experts(x, idx, w, gate_up, down, "reference")  # a module's own choice wins
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert torch.equal(fixed, want)
    # decode_experts="grouped_mm": the all-experts path as grouped GEMMs over the sorted pairs (some experts get none),
    # eager and traced by torch.compile; the gather path (N * k <= E / 2) is unchanged
    idx[:, 0] = idx[:, 0] % 3  # experts 3.. are chosen less, and some not at all
    idx[:, 1] = torch.where(idx[:, 1] == idx[:, 0], (idx[:, 0] + 1) % 3, idx[:, 1] % 6)
    want = moe_ops.experts_reference(x, idx, w, gate_up, down)
    bf = [t.bfloat16() for t in (x, gate_up, down)]  # (torch.compile's _grouped_mm takes bf16 only)
    with override(experts="decode", decode_experts="grouped_mm"):
        eager = moe_ops.experts(x, idx, w, gate_up, down, "auto")
        traced = torch.compile(moe_ops.experts_decode, fullgraph=True, dynamic=False)(bf[0], idx, w, *bf[1:])
    torch.testing.assert_close(eager, want, rtol=1e-5, atol=1e-4)
    assert float((traced.float() - want).norm() / want.norm()) < 2e-2
    if N * k * 2 > E:
        assert not torch.equal(moe_ops.experts_sorted(x, idx, w, gate_up, down),
                               moe_ops.experts_decode(x, idx, w, gate_up, down))  # (the other path ran above)


_TRITON_EXPERTS = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch
from mimo_flash.ops import moe as moe_ops
from mimo_flash.options import override

torch.set_num_threads(1)
g = torch.Generator().manual_seed(7)
# decode_experts="triton": the pairs sorted by expert through ops/kernels/moe.py's grouped kernel. E = 6 and k = 2:
# 3 tokens are past E/2 pairs; 40 tokens give one expert more than 16 rows (two tiles); experts 4 and 5 get none;
# K = 160 and I = 72 leave partial K steps and N tiles
E, D, I, k = 6, 160, 72, 2
gate_up, down = torch.randn(E, 2 * I, D, generator=g) * 0.1, torch.randn(E, D, I, generator=g) * 0.1
for N in (3, 40):
    x = torch.randn(N, D, generator=g)
    idx = torch.stack([torch.randperm(4, generator=g)[:k] for _ in range(N)])
    idx[: N // 2, 0] = 0
    idx[: N // 2, 1] = 1 + torch.randint(0, 3, (N // 2,), generator=g)
    w = torch.rand(N, k, generator=g)
    want = moe_ops.experts_reference(x, idx, w, gate_up, down)
    with override(experts="decode", decode_experts="triton"):
        got = moe_ops.experts(x, idx, w, gate_up, down, "auto")
    err = float((got - want).abs().max() / want.abs().max())
    assert err < 1e-5, (N, err)
    # half precision, each product rounded once as torch._grouped_mm rounds (fp16: the interpreter's dots in bf16
    # are wrong in Triton 3.6; the GPU test runs bf16)
    xh, gh, dh = x.half(), gate_up.half(), down.half()
    with override(decode_experts="triton"):
        got = moe_ops.experts_decode(xh, idx, w, gh, dh)
    ref = moe_ops.experts_reference(xh.float(), idx, w, gh.float(), dh.float())
    assert got.dtype == torch.float16 and float((got.float() - ref).norm() / ref.norm()) < 1e-2
with override(decode_experts="nope"):
    try:
        moe_ops.experts_decode(x, idx, w, gate_up, down)
        raise AssertionError("accepted decode_experts='nope'")
    except ValueError as e:
        assert "decode_experts" in str(e) and "nope" in str(e)
print("ok")
"""


def test_experts_decode_triton_equals_reference():
    run_in_triton_interpreter(_TRITON_EXPERTS)


def test_linear_reduction_backend_equals_f_linear():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 40, generator=g)
    for x in (torch.randn(1, 1, 40, generator=g), torch.randn(3, 5, 40, generator=g)):
        with override(linear="reduction"):
            got = linear(x, w)
            gemm = linear(x, w, "gemm")
        torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)
        assert torch.equal(gemm, F.linear(x, w))
    xb, wb = torch.randn(1, 40, generator=g).bfloat16(), w.bfloat16()  # fp32 sums, rounded once
    with override(linear="reduction"):
        got = linear(xb, wb)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, (xb.float() @ wb.float().T).bfloat16())
    with pytest.raises(ValueError, match="unknown linear backend 'nope'"):
        linear(xb, wb, "nope")


def test_model_projections_follow_the_linear_option():
    """Every projection but lm_head runs the option's backend (lm_head is a GEMM by declaration)."""
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids, mtp=True)
        with override(linear="reduction"):
            out = model(ids, mtp=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    for a, b in zip(out.mtp_logits, ref.mtp_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    lins = {n: m.backend for n, m in model.named_modules() if isinstance(m, Linear)}
    assert lins.pop("lm_head") == "gemm" and set(lins.values()) == {"auto"}
    assert any(n.endswith("qkv_proj") for n in lins) and any(n.endswith("gate_up_proj") for n in lins)


# ------------------------------------------------------------------ the compiled decode path (default suite)
def test_compiled_decode_step_matches_eager():
    """GraphRunner(compile=True) on the CPU: the one-row step traced with the decode backends (router "decode",
    experts "decode", linear "reduction") gives the eager step's logits and hidden states, and generate() through
    the real runner selection (compile=True) gives the eager tokens. A small model: the compile is the cost."""
    model = tiny_model(vocab_size=32, num_hidden_layers=2)
    cfg, P, S = model.config, 6, 64
    ids = torch.randint(0, 32, (1, P), generator=torch.Generator().manual_seed(11))
    graphed = GraphRunner(model, KVCache(cfg, 1, S, dtype=model.dtype, slack=15), S, compile=True)
    eager = Runner(model, KVCache(cfg, 1, S, dtype=model.dtype, slack=15), S)
    with torch.no_grad():
        lg, _ = prefill(eager, ids, None, 4, keep_hidden=False)
        prefill(graphed, ids, None, 4, keep_hidden=False)
        tok = lg.argmax(-1)
        for i in range(3):
            pos = torch.full((1, 1), P + i, dtype=torch.long)
            a, ha = graphed.main(tok[:, None], pos, None, P + i + 1, graph=True)
            b, hb = eager.main(tok[:, None], pos, None, P + i + 1)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ha, hb, rtol=1e-4, atol=1e-5)
            tok = b[:, -1].argmax(-1)
    assert list(graphed.fns) == [("main", 1, 1, 64, True, "all")] and not graphed.notes  # traced, one shape
    plain = generate(model, ids, max_new_tokens=5, eos_token_id=[])
    out, stats = generate(model, ids, max_new_tokens=5, eos_token_id=[], compile=True, return_stats=True)
    assert torch.equal(out, plain) and stats.runner == "GraphRunner" and stats.notes == []


# ------------------------------------------------------------------ captured steps (graph-shaped code, no graphs)
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
    calls = []
    real = spec_mod._graphed_step

    def counted(runner, st, frozen, n=1):
        calls.append(n)
        return real(runner, st, frozen, n)

    monkeypatch.setattr(spec_mod, "_graphed_step", counted)
    out, stats = generate(model, ids, num_speculative_tokens=K, return_stats=True, cuda_graphs=True, **kw)
    assert torch.equal(out, plain) and stats.runner == "GraphRunner"
    # every step after the first, in chunks of up to SPEC_CHUNK (single steps near the cache's end)
    assert stats.accepted > 0 and sum(calls) == stats.steps - 1 and max(calls) == spec_mod.SPEC_CHUNK
    assert stats.notes == []
    # rows that finish early (EOS) are frozen inside the step
    assert torch.equal(generate(model, ids, num_speculative_tokens=K, eos_token_id=3, pad_token_id=5,
                                cuda_graphs=True, **kw), eos_plain)
    # the step-by-step path gives the same tokens
    n = len(calls)
    with override(spec_graph=False):
        assert torch.equal(generate(model, ids, num_speculative_tokens=K, cuda_graphs=True, **kw), plain)
    assert len(calls) == n


def test_whole_step_falls_back_when_it_fails(monkeypatch):
    model = tiny_model(vocab_size=6)
    ids = torch.randint(0, 6, (1, 9), generator=torch.Generator().manual_seed(8))
    plain = generate(model, ids, max_new_tokens=20)

    def broken(*a, **k):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(spec_mod, "_graphed_step", broken)
    with pytest.warns(UserWarning, match="step-by-step"):
        out, stats = generate(model, ids, max_new_tokens=20, num_speculative_tokens=2, cuda_graphs=True,
                              return_stats=True)
    assert torch.equal(out, plain)
    assert len(stats.notes) == 1 and "graphed spec step failed" in stats.notes[0] and "capture failed" in stats.notes[0]
    # the runner remembers: the next call takes the step-by-step path without trying again
    out, stats = generate(model, ids, max_new_tokens=20, num_speculative_tokens=2, cuda_graphs=True,
                          return_stats=True)
    assert torch.equal(out, plain) and len(stats.notes) == 1


def test_tuning_failure_falls_back_to_the_plain_compile(monkeypatch):
    """A compiled step that fails with coordinate-descent tuning is retried without it, and says so."""
    model = tiny_model(vocab_size=6)
    cfg, S = model.config, 64
    with override(decode_tune=True):
        r = GraphRunner(model, KVCache(cfg, 1, S, dtype=model.dtype), S)
    assert r.tune
    monkeypatch.setattr(r, "_wants_tune", lambda key, rows: r.tune)
    tried = []

    def flaky(key, fn, inputs, rows, tune):
        tried.append(tune)
        if tune:
            raise RuntimeError("tuning broke")
        return fn(**inputs)

    monkeypatch.setattr(r, "_run_once", flaky)
    with pytest.warns(UserWarning, match="coordinate-descent tuning failed"):
        out = r._run(("main", 1, 1, 64, True, "all"), lambda x: x + 1, dict(x=torch.zeros(1)), rows=1)
    assert tried == [True, False] and not r.tune and torch.equal(out, torch.ones(1))
    assert "tuning broke" in r.notes[0]


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3])
def test_compiled_decode_step_matches_eager_on_gpu(rows):
    """The compiled, captured decode step on CUDA (fp32; Triton step off: it is bf16-only and tested in
    test_triton_decode.py) against the eager step, for one row (reduction products) and several."""
    model = tiny_model(vocab_size=64).cuda()
    cfg, P, S = model.config, 10, 128
    ids = torch.randint(0, 64, (rows, P), generator=torch.Generator().manual_seed(21)).cuda()
    with override(decode_triton="off"):
        graphed = GraphRunner(model, KVCache(cfg, rows, S, device="cuda", dtype=model.dtype, slack=15), S,
                              compile=True)
    eager = Runner(model, KVCache(cfg, rows, S, device="cuda", dtype=model.dtype, slack=15), S)
    with torch.no_grad():
        lg, _ = prefill(eager, ids, None, 8, keep_hidden=False)
        prefill(graphed, ids, None, 8, keep_hidden=False)
        tok = lg.argmax(-1)
        for i in range(8):
            pos = torch.full((rows, 1), P + i, device="cuda", dtype=torch.long)
            a, _ = graphed.main(tok[:, None], pos, None, P + i + 1, graph=True)
            b, _ = eager.main(tok[:, None], pos, None, P + i + 1)
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
            tok = b[:, -1].argmax(-1)
    assert not graphed.notes and len(graphed.graphs) == 1 and not graphed.triton
