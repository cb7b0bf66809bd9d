"""The batch-1 Triton decode step (generation/triton_step.py, generation/kernels.py) and the graphed greedy
loop of generate().

The kernels run in Triton's CPU interpreter (fp32: the interpreter mishandles bf16 dots and roundings) against
the eager Runner; on a GPU, in bf16, against the eager Runner too. The greedy loop's one-graph-per-chunk path
runs on CPU through generate(cuda_graphs=True): the GraphRunner, its steps run directly (no graphs there)."""

from __future__ import annotations

import pytest
import torch

from conftest import run_in_triton_interpreter, tiny_model
from mimo_flash.generation import KVCache, generate
from mimo_flash.generation.runner import GraphRunner
from mimo_flash.options import override

_INTERPRETED = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import sys
from pathlib import Path
import torch
import mimo_flash
sys.path.insert(0, str(Path(mimo_flash.__file__).resolve().parents[2] / "tests"))
from conftest import tiny_model
from mimo_flash.generation import KVCache, generate
from mimo_flash.generation import engine, triton_step
from mimo_flash.generation.engine import prefill
from mimo_flash.generation.runner import Runner
from mimo_flash.options import TritonStepTuning, override, set_options

set_options(triton_step=TritonStepTuning(min_programs=1))  # few programs: the interpreter runs each in Python
torch.set_num_threads(1)
# window 9: the SWA rings wrap during the steps below; the second case has the ring slack of graphed greedy
# decoding (15 slots) and a prompt longer than the ring, prefilled in one chunk
cases = ((dict(), 0, 8, 5),
         (dict(add_full_attention_sink_bias=True, norm_topk_prob=False, routed_scaling_factor=2.5), 15, 40, 40))
for overrides, slack, P, chunk in cases:
    model = tiny_model(seed=3, **overrides)
    cfg = model.config
    S = 256  # full layers: 4 key splits per kv head
    ids = torch.randint(0, cfg.vocab_size, (1, P), generator=torch.Generator().manual_seed(5))
    eager = Runner(model, KVCache(cfg, 1, S, dtype=model.dtype, slack=slack), S)
    stepped = Runner(model, KVCache(cfg, 1, S, dtype=model.dtype, slack=slack), S)  # its cache: the Triton step's
    with torch.no_grad():
        lg, _ = prefill(eager, ids, None, chunk, keep_hidden=False)
        prefill(stepped, ids, None, chunk, keep_hidden=False)
        step = triton_step.TritonStep(model, stepped.cache, stepped.rope_tables)
        tok = lg.argmax(-1)
        for i in range(10):
            pos = torch.full((1, 1), P + i, dtype=torch.long)
            a, ha = step(tok[:, None], pos, 256)
            b, hb = eager.main(tok[:, None], pos, None, P + i + 1)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ha, hb, rtol=1e-5, atol=1e-5)
            assert torch.equal(step.token, a[:, -1].argmax(-1))  # the lm_head kernel's greedy token
            tok = b[:, -1].argmax(-1)
    # the cache after the Triton steps (its table kernel applies the cache's one-token rule) = after step()
    assert eager.cache.layers() == stepped.cache.layers()
    for i in eager.cache.layers():
        a, b = stepped.cache.layer_slots(i), eager.cache.layer_slots(i)
        torch.testing.assert_close(a.k, b.k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.v, b.v, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.valid, b.valid) and torch.equal(a.pos, b.pos) and a.ring == b.ring

# the L2 prefetch plan: each layer's o_proj and each later layer's q/k/v once, by the router of the layer
# before where it has one, at most two tensors per kernel; never an expert's weights
layers = model.model.layers
moe = [hasattr(layer.mlp, "experts") for layer in layers]
assert not moe[0] and all(moe[1:])  # the tiny preset: a dense first layer
pulled = [t.data_ptr() for a, r in step.prefetch for t in a + r]
want = [l.self_attn.o_proj.weight.data_ptr() for l in layers] + [l.self_attn.qkv_proj.weight.data_ptr() for l in layers[1:]]
assert sorted(pulled) == sorted(want + [model.lm_head.weight.data_ptr()])
assert all(len(a) <= 2 and len(r) <= 2 for a, r in step.prefetch)
assert step.prefetch[0][1] == [] and all(a == [] for a, _ in step.prefetch[2:])  # MoE after MoE: all by the router
assert step.prefetch[-1][1][0].data_ptr() == model.lm_head.weight.data_ptr()

# generate() through a GraphRunner whose one-token steps are the Triton step: the same tokens
model = tiny_model(seed=4)
ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(6))
plain = generate(model, ids, max_new_tokens=12, eos_token_id=[])
with override(decode_triton="always"):
    out, stats = generate(model, ids, max_new_tokens=12, eos_token_id=[], cuda_graphs=True, return_stats=True)
assert torch.equal(out, plain) and stats.runner == "GraphRunner" and stats.notes == []
(r,) = engine._RUNNERS[model].values()  # the runner generate() built and keeps for the next call
assert r.triton and r._triton_step is not None and not r.fns  # every one-token step ran the Triton step
print("ok")
"""


def test_triton_step_matches_the_eager_step():
    run_in_triton_interpreter(_INTERPRETED)


_INTERPRETED_FP8 = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import sys
from pathlib import Path
import torch
import mimo_flash
sys.path.insert(0, str(Path(mimo_flash.__file__).resolve().parents[2] / "tests"))
from conftest import tiny_model
from mimo_flash.generation import KVCache, generate
from mimo_flash.generation import engine, triton_step
from mimo_flash.generation.engine import prefill
from mimo_flash.generation.runner import Runner
from mimo_flash.options import TritonStepTuning, override, set_options
from mimo_flash.quant import FP8, FP8Linear, quantize_model_

torch.set_num_threads(1)


def check(model, P=8, chunk=5, steps=10):
    # the Triton step of an FP8-resident model against the eager step of the same model (FP8Linear /
    # FP8Experts' reference products), 10 steps: the SWA rings (window 9) wrap
    cfg, S = model.config, 256
    ids = torch.randint(0, cfg.vocab_size, (1, P), generator=torch.Generator().manual_seed(5))
    eager = Runner(model, KVCache(cfg, 1, S, dtype=model.dtype), S)
    stepped = Runner(model, KVCache(cfg, 1, S, dtype=model.dtype), S)
    with torch.no_grad():
        lg, _ = prefill(eager, ids, None, chunk, keep_hidden=False)
        prefill(stepped, ids, None, chunk, keep_hidden=False)
        step = triton_step.TritonStep(model, stepped.cache, stepped.rope_tables)
        tok = lg.argmax(-1)
        for i in range(steps):
            pos = torch.full((1, 1), P + i, dtype=torch.long)
            a, ha = step(tok[:, None], pos, 256)
            b, hb = eager.main(tok[:, None], pos, None, P + i + 1)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ha, hb, rtol=1e-5, atol=1e-5)
            assert torch.equal(step.token, b[:, -1].argmax(-1))  # the greedy token of the reference
            tok = b[:, -1].argmax(-1)
    for i in eager.cache.layers():
        torch.testing.assert_close(stepped.cache.layer_slots(i).k, eager.cache.layer_slots(i).k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stepped.cache.layer_slots(i).v, eager.cache.layer_slots(i).v, rtol=1e-5, atol=1e-6)


def fp8(t):
    return t.dtype == FP8


# 1. the tiny preset, every projection the release quantizes in FP8 (MTP layers too: the step skips them);
#    its widths (64 columns, 272 / 352 q/k/v rows, 32-row experts) are all partial 128 blocks
set_options(triton_step=TritonStepTuning(min_programs=1))  # few programs: the interpreter runs each in Python
model = tiny_model(seed=3)
quantize_model_(model)
assert fp8(model.model.layers[0].mlp.down_proj.weight) and fp8(model.model.layers[1].mlp.experts.down_proj)
check(model)

# generate() through a GraphRunner picks the Triton step for the FP8 model: the same tokens as the eager loop
ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(6))
plain = generate(model, ids, max_new_tokens=8, eos_token_id=[])
with override(decode_triton="always"):
    out, stats = generate(model, ids, max_new_tokens=8, eos_token_id=[], cuda_graphs=True, return_stats=True)
assert torch.equal(out, plain) and stats.runner == "GraphRunner" and stats.notes == []
(r,) = engine._RUNNERS[model].values()
assert r.triton and r._triton_step is not None and not r.fns  # every one-token step ran the Triton step

# 2. widths spanning several 128 blocks, the last partial, in rows and columns: D = 192 (2 scale columns; K
#    tiles of 256 columns take both), q/k/v 272 rows (3 scale rows; 16-row tiles), the experts' I = 80 (their
#    up rows start inside a block: 64-row gate/up tiles would straddle one, so the step takes 16), dense 2 x 200
set_options(triton_step=TritonStepTuning(min_programs=1, gate_up_tile=16384))
model = tiny_model(seed=7, hidden_size=192, intermediate_size=200, moe_intermediate_size=80)
quantize_model_(model)
a, ex = model.model.layers[1].self_attn, model.model.layers[1].mlp.experts
assert tuple(a.qkv_proj.weight_scale_inv.shape) == (3, 2) and tuple(ex.gate_up_proj_scale_inv.shape[1:]) == (2, 2)
assert tuple(model.model.layers[0].mlp.down_proj.weight_scale_inv.shape) == (2, 2)
assert triton_step.gemv_blocks(272, 192)[1] == 256 and triton_step.gemv_blocks(2 * 80, 192, 16384)[0] == 64
check(model, steps=6)

# 3. a mixed model, as a checkpoint that stores some quantizable tensors unquantized loads (quantize_model_'s
#    include): FP8 in the dense MLP, two layers' q/k/v and one layer's experts; one o_proj made FP8 too. K tiles
#    of 64 columns: D = 192 and the dense MLP's 200 take several, the scale column changing between them
set_options(triton_step=TritonStepTuning(min_programs=1, max_k=64))
model = tiny_model(seed=4, add_full_attention_sink_bias=True, hidden_size=192, intermediate_size=200)
keep = {"model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.qkv_proj",
        "model.layers.4.self_attn.qkv_proj", "model.layers.2.mlp.experts"}
assert sorted(quantize_model_(model, include=keep.__contains__)) == sorted(keep)
model.model.layers[3].self_attn.o_proj = FP8Linear.from_linear(model.model.layers[3].self_attn.o_proj)
layers = model.model.layers
assert [fp8(l.self_attn.qkv_proj.weight) for l in layers] == [False, True, False, False, True, False]
assert [fp8(l.mlp.experts.gate_up_proj) for l in layers[1:]] == [False, True, False, False, False]
check(model, P=12, chunk=12)
print("ok")
"""


_INTERPRETED_VERIFY = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import sys
from pathlib import Path
import torch
import mimo_flash
sys.path.insert(0, str(Path(mimo_flash.__file__).resolve().parents[2] / "tests"))
from conftest import tiny_model
from mimo_flash.generation import KVCache, generate
from mimo_flash.generation import engine, triton_step
from mimo_flash.generation.cache import MAIN
from mimo_flash.generation.engine import prefill
from mimo_flash.generation.runner import Runner
from mimo_flash.options import TritonStepTuning, override, set_options
from mimo_flash.quant import quantize_model_

set_options(triton_step=TritonStepTuning(min_programs=1))  # few programs: the interpreter runs each in Python
torch.set_num_threads(1)


def check(model, rounds=5, P=8, slack=6):
    # TritonStep.verify of T = 2 .. 4 tokens against the eager step of the same T tokens, each round followed by
    # the rollback verification makes (some tokens accepted): positions run past the SWA ring (window 9, 15 slots;
    # 5 rounds reach position 19)
    cfg, S = model.config, 256
    ids = torch.randint(0, cfg.vocab_size, (1, P), generator=torch.Generator().manual_seed(5))
    eager = Runner(model, KVCache(cfg, 1, S, dtype=model.dtype, slack=slack), S)
    stepped = Runner(model, KVCache(cfg, 1, S, dtype=model.dtype, slack=slack), S)
    g = torch.Generator().manual_seed(6)
    n = P
    with torch.no_grad():
        prefill(eager, ids, None, 5, keep_hidden=False)
        prefill(stepped, ids, None, 5, keep_hidden=False)
        step = triton_step.TritonStep(model, stepped.cache, stepped.rope_tables)
        for i in range(rounds):
            T = (2, 4, 3, 4)[i % 4]
            toks = torch.randint(0, cfg.vocab_size, (1, T), generator=g)
            pos = (n + torch.arange(T))[None]
            a, ha = step.verify(toks, pos, 256)
            b, hb = eager.main(toks, pos, None, n + T)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ha, hb, rtol=1e-5, atol=1e-5)
            n += 1 + i % T  # accepted; the rest rolled back
            for c in (eager.cache, stepped.cache):
                c.rollback(torch.tensor([n]), MAIN)
    assert n > 15  # positions past the SWA ring's 15 slots
    for i in eager.cache.layers():
        a, b = stepped.cache.layer_slots(i), eager.cache.layer_slots(i)
        torch.testing.assert_close(a.k, b.k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.v, b.v, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.valid, b.valid) and torch.equal(a.pos, b.pos)


check(tiny_model(seed=3))
check(tiny_model(seed=4, add_full_attention_sink_bias=True, norm_topk_prob=False, routed_scaling_factor=2.5))
fp8 = tiny_model(seed=3)
quantize_model_(fp8)  # every projection the release quantizes, FP8-resident (partial 128 blocks)
check(fp8, rounds=4)

# generate() with MTP speculation at batch 1 through a GraphRunner: the verification forwards run verify()
# (inside the whole-step graph's code), the drafts the compiled path; the tokens are plain greedy's
model = tiny_model(seed=4)
ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(6))
plain = generate(model, ids, max_new_tokens=6, eos_token_id=[])
with override(decode_triton="always", decode_triton_verify=True):
    out, stats = generate(model, ids, max_new_tokens=6, eos_token_id=[], num_speculative_tokens=3,
                          cuda_graphs=True, return_stats=True)
assert torch.equal(out, plain) and stats.notes == []
(r,) = engine._RUNNERS[model].values()
assert r.triton and set(r._triton_step._multi) == {4} and stats.drafted > 0  # T = K + 1 verifications
assert not any(k[0] == "main" for k in r.fns)  # no main forward took the compiled path
print("ok")
"""


def test_triton_verification_matches_the_eager_step():
    """TritonStep.verify (speculative verification of T tokens at batch 1) against the eager step, fp32 and FP8,
    with the rollbacks verification makes; and generate()'s speculative decoding through it (interpreter)."""
    run_in_triton_interpreter(_INTERPRETED_VERIFY)


_INTERPRETED_DRAFT = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import sys
from pathlib import Path
import torch
import mimo_flash
sys.path.insert(0, str(Path(mimo_flash.__file__).resolve().parents[2] / "tests"))
from conftest import tiny_model
from mimo_flash.generation import KVCache, generate
from mimo_flash.generation import engine, triton_step
from mimo_flash.generation.cache import mtp_group
from mimo_flash.generation.runner import Runner
from mimo_flash.options import TritonStepTuning, override, set_options
from mimo_flash.quant import quantize_model_

set_options(triton_step=TritonStepTuning(min_programs=1))  # few programs: the interpreter runs each in Python
torch.set_num_threads(1)
K = 3


def check(model, rounds=6):
    # TritonStep.draft of MTP layer k over T = K + 1 + k columns, the first ones masked as a speculative step masks
    # them (positions already computed), against the eager MTP forward; then the rollback the step makes.
    # Positions run past the MTP rings (window 9 + slack 2K = 15 slots): 6 rounds reach position 19.
    cfg, S = model.config, 256
    caches = [KVCache(cfg, 1, S, dtype=model.dtype, num_mtp=K, slack=2 * K) for _ in range(2)]
    eager, stepped = Runner(model, caches[0], S), Runner(model, caches[1], S)
    step = triton_step.TritonStep(model, stepped.cache, stepped.rope_tables)
    g = torch.Generator().manual_seed(7)
    n, n_prev, masked = 6, 0, 0
    with torch.no_grad():
        for i in range(rounds):
            for k in range(K):
                T = K + 1 + k
                pos = (n - T + torch.arange(T))[None]
                valid = (pos >= n_prev - k) & (pos >= 0)
                masked += int((~valid).sum())
                ids = torch.randint(0, cfg.vocab_size, (1, T), generator=g)
                h = torch.randn(1, T, cfg.hidden_size, generator=g)
                la, ha = step.draft(k, ids, h, pos.clamp_min(0), None if bool(valid.all()) else valid)
                lb, hb = eager.mtp(k, ids, h, pos, valid)
                torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(ha[valid], hb[valid], rtol=1e-5, atol=1e-5)
            n_prev, n = n, n + 1 + i % (K + 1)  # accepted drafts + 1
            for j in range(K):  # what _step_core keeps of each MTP layer
                for c in caches:
                    c.rollback(torch.tensor([n_prev - j]), mtp_group(j))
    assert n > 15 and masked > 0  # the rings (15 slots) wrapped
    for j in range(K):
        i = cfg.num_hidden_layers + j
        a, b = stepped.cache.layer_slots(i), eager.cache.layer_slots(i)
        assert torch.equal(a.valid, b.valid) and torch.equal(a.pos, b.pos) and a.ring
        v = a.valid
        torch.testing.assert_close(a.k[:, v], b.k[:, v], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.v[:, v], b.v[:, v], rtol=1e-5, atol=1e-6)


check(tiny_model(seed=3, num_nextn_predict_layers=K))
check(tiny_model(seed=4, num_nextn_predict_layers=K, add_swa_attention_sink_bias=False))
fp8 = tiny_model(seed=3, num_nextn_predict_layers=K)
quantize_model_(fp8)  # the MTP layers' q/k/v and MLP projections too (partial 128 blocks)
assert fp8.model.mtp.layers[0].self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
check(fp8, rounds=4)

# speculative generate() at batch 1 through a GraphRunner: drafts through draft(), verification through verify(),
# inside the whole-step code; the tokens are plain greedy's, and no MTP forward took the compiled path
model = tiny_model(seed=4, num_nextn_predict_layers=K)
ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(6))
plain = generate(model, ids, max_new_tokens=6, eos_token_id=[])
with override(decode_triton="always", decode_triton_verify=True):
    out, stats = generate(model, ids, max_new_tokens=6, eos_token_id=[], num_speculative_tokens=K,
                          cuda_graphs=True, return_stats=True)
assert torch.equal(out, plain) and stats.notes == [] and stats.drafted > 0
(r,) = engine._RUNNERS[model].values()
assert set(r._triton_step._drafts) == {(0, 4), (1, 5), (2, 6)}  # (k, K + 1 + k)
assert not any(key[0] in ("main", "mtp") for key in r.fns)
print("ok")
"""


def test_triton_drafting_matches_the_eager_mtp_layers():
    """TritonStep.draft (an MTP layer's T columns at batch 1, masked ones included) against the eager MTP
    forward and its cache writes, with sinks and without, FP8-resident; and speculative generate() through it."""
    run_in_triton_interpreter(_INTERPRETED_DRAFT)


def test_triton_step_fp8_matches_the_eager_fp8_step():
    """FP8-resident models (whole, partial 128 blocks in rows and columns, mixed) through the Triton step, and
    generate()'s GraphRunner choosing it (Triton's CPU interpreter, fp32 model)."""
    run_in_triton_interpreter(_INTERPRETED_FP8)


def test_triton_step_takes_fp8_models_and_refuses_what_it_cannot_read():
    from mimo_flash.generation.triton_step import unsupported
    from mimo_flash.quant import FP8Linear, quantize_model_

    model = tiny_model()
    quantize_model_(model)
    cache = KVCache(model.config, 1, 32, dtype=model.dtype)
    assert unsupported(model, cache) is None
    with override(decode_triton="always"):
        assert GraphRunner(model, cache, 32).triton  # the runner's one-token steps: the Triton step
    qkv = model.model.layers[2].self_attn.qkv_proj
    full = qkv.weight_scale_inv
    qkv.weight_scale_inv = torch.nn.Parameter(full[:2], requires_grad=False)  # 272 rows need 3 scale rows
    why = unsupported(model, cache)
    assert "model.layers.2.self_attn.qkv_proj.weight" in why and "(3, 1)" in why
    qkv.weight_scale_inv = full
    model.lm_head = FP8Linear.from_linear(model.lm_head)  # not a projection the step reads as FP8
    assert "FP8 weight lm_head.weight" in unsupported(model, cache)


def test_graphed_greedy_loop_equals_step_by_step(monkeypatch):
    model = tiny_model(vocab_size=6)
    ids = torch.randint(0, 6, (3, 12), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kw = dict(attention_mask=mask, max_new_tokens=40)
    plain = generate(model, ids, eos_token_id=[], **kw)
    eos = generate(model, ids, eos_token_id=3, pad_token_id=5, **kw)
    assert (eos[:, 12:] == 5).any()  # rows end at different steps, mid-chunk
    keys = []
    real = GraphRunner.run_step

    def counted(self, key, fn, inputs, rows=2, rng=None):
        keys.append(key)
        return real(self, key, fn, inputs, rows, rng)

    monkeypatch.setattr(GraphRunner, "run_step", counted)
    out, stats = generate(model, ids, eos_token_id=[], return_stats=True, cuda_graphs=True, **kw)
    assert torch.equal(out, plain) and stats.steps == 39 and stats.runner == "GraphRunner"
    assert [k[0] for k in keys] == ["greedy"] * 4 and [k[3] for k in keys] == [4, 8, 16, 11]  # steps per graph
    out, stats = generate(model, ids, eos_token_id=3, pad_token_id=5, return_stats=True, cuda_graphs=True, **kw)
    assert torch.equal(out, eos) and stats.notes == []


def test_graphed_greedy_loop_falls_back(monkeypatch):
    model = tiny_model(vocab_size=6)
    ids = torch.randint(0, 6, (1, 9), generator=torch.Generator().manual_seed(8))
    plain = generate(model, ids, max_new_tokens=30, eos_token_id=[])
    real = GraphRunner.run_step
    calls = []

    def flaky(self, key, fn, inputs, rows=2, rng=None):
        calls.append(key)
        if len(calls) == 2:  # the second chunk
            raise RuntimeError("capture failed")
        return real(self, key, fn, inputs, rows, rng)

    monkeypatch.setattr(GraphRunner, "run_step", flaky)
    with pytest.warns(UserWarning, match="graphed greedy step failed"):
        out, stats = generate(model, ids, max_new_tokens=30, eos_token_id=[], cuda_graphs=True, return_stats=True)
    assert torch.equal(out, plain)
    assert len(stats.notes) == 1 and "capture failed" in stats.notes[0]
    n = len(calls)  # the runner remembers: the next call takes the step-by-step path without trying again
    assert torch.equal(generate(model, ids, max_new_tokens=30, eos_token_id=[], cuda_graphs=True), plain)
    assert len(calls) == n


def test_triton_step_is_only_used_where_it_applies():
    from mimo_flash.generation.triton_step import gemv_blocks, unsupported

    model = tiny_model()
    assert unsupported(model, KVCache(model.config, 2, 32, dtype=model.dtype)) == "batch size is not 1"
    assert unsupported(model, KVCache(model.config, 1, 32, dtype=model.dtype)) is None
    grouped = tiny_model(n_group=2, topk_group=1)
    assert "grouped" in unsupported(grouped, KVCache(grouped.config, 1, 32, dtype=grouped.dtype))
    r = GraphRunner(model, KVCache(model.config, 1, 32, dtype=model.dtype), 32)  # CPU: off unless asked for
    assert not r.triton
    with override(decode_triton="always"):
        assert GraphRunner(model, KVCache(model.config, 1, 32, dtype=model.dtype), 32).triton
        assert not GraphRunner(model, KVCache(model.config, 2, 32, dtype=model.dtype), 32).triton
    with override(decode_triton="on"), pytest.raises(ValueError, match="decode_triton must be"):
        GraphRunner(model, KVCache(model.config, 1, 32, dtype=model.dtype), 32)
    # GEMV tiles: K blocks up to 1024, at most `tile` elements, rows halved towards 264 programs
    assert gemv_blocks(32000, 1024, 4096) == (4, 1024)
    assert gemv_blocks(64, 1024, 4096) == (2, 1024)
    assert gemv_blocks(1024, 2048, 4096) == (2, 1024)
    assert gemv_blocks(4096, 1024, 2048) == (2, 1024)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [True, False])
def test_triton_step_matches_eager_on_gpu(pdl):
    with override(decode_pdl=pdl):  # read when the runner builds its Triton step (at its first one-token step)
        _triton_step_matches_eager_on_gpu(pdl)


def _triton_step_matches_eager_on_gpu(pdl):
    from mimo_flash.generation import triton_step

    graphed = _graphed_matches_eager_on_gpu(tiny_model(seed=2).to(device="cuda", dtype=torch.bfloat16))
    assert graphed._triton_step.pdl == (pdl and triton_step.pdl_works(torch.device("cuda")))


def _graphed_matches_eager_on_gpu(model):
    """A bf16 CUDA model: the graphed runner's one-token steps (the Triton step) against eager steps, 30 steps
    after a 20-token prompt, across the SWA window. Returns the graphed runner."""
    from mimo_flash.generation.engine import prefill
    from mimo_flash.generation.runner import Runner

    cfg, P, S = model.config, 20, 128
    ids = torch.randint(0, cfg.vocab_size, (1, P), generator=torch.Generator().manual_seed(2)).cuda()
    graphed = GraphRunner(model, KVCache(cfg, 1, S, device="cuda", dtype=torch.bfloat16), S)
    eager = Runner(model, KVCache(cfg, 1, S, device="cuda", dtype=torch.bfloat16), S)
    assert graphed.triton
    with torch.no_grad():
        lg, _ = prefill(eager, ids, None, 8, keep_hidden=False)
        prefill(graphed, ids, None, 8, keep_hidden=False)
        tok = lg.argmax(-1)
        for i in range(30):
            pos = torch.full((1, 1), P + i, device="cuda", dtype=torch.long)
            a, _ = graphed.main(tok[:, None], pos, None, P + i + 1, graph=True)
            b, _ = eager.main(tok[:, None], pos, None, P + i + 1)
            a, b = a.float(), b.float()
            assert float((a - b).norm() / b.norm()) < 3e-2
            tok = b[:, -1].argmax(-1)
    assert not graphed.notes and ("main-triton", 128) in graphed.graphs
    return graphed


@pytest.mark.gpu
def test_triton_step_fp8_matches_the_fp8_torch_step_on_gpu():
    """An FP8-resident model in bf16 on CUDA: the graphed Triton step (FP8 bytes read by its kernels) against
    the eager step (FP8Linear / FP8Experts through quant/triton_fp8.py), 30 steps across the SWA window."""
    from mimo_flash.quant import FP8, quantize_model_

    model = tiny_model(seed=2, hidden_size=192, moe_intermediate_size=80)  # partial 128 blocks, 2 scale columns
    quantize_model_(model)
    model = model.to(device="cuda", dtype=torch.bfloat16)
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == FP8 and model.dtype == torch.bfloat16
    _graphed_matches_eager_on_gpu(model)


@pytest.mark.gpu
def test_fp8_trained_model_greedy_through_the_triton_step_on_gpu():
    """generate() at batch 1 on CUDA (the Triton step, reading FP8) gives the greedy tokens of the CPU fp32 run
    on a model confident enough that bf16 rounding does not flip them."""
    import copy

    from test_quant import _trained_tiny

    from mimo_flash.generation import engine
    from mimo_flash.quant import quantize_model_

    model, data, _ = _trained_tiny()
    quantize_model_(model)
    prompt = data[:1, :10]
    cpu = generate(model, prompt, max_new_tokens=40, eos_token_id=[])
    gpu = copy.deepcopy(model).to("cuda", torch.bfloat16)
    out, stats = generate(gpu, prompt.cuda(), max_new_tokens=40, eos_token_id=[], return_stats=True)
    (r,) = engine._RUNNERS[gpu].values()
    assert r.triton and r._triton_step is not None and stats.notes == []
    assert torch.equal(out.cpu(), cpu)


def separated_routing(model, gap: float = 0.3):
    """Correction biases gap apart, so that no two experts' choice scores are near a tie: with random weights,
    bf16 rounding (which differs between the Triton kernels and the eager ops) flips near-tied expert choices,
    and one flipped choice moves a token's logits by 5-20% (seen on an H200: tiny models with random routers
    gave 6-21% on a few tokens through the Triton path, 0.6-13% through the compiled and eager bf16 paths,
    all within 1% with these biases)."""
    from mimo_flash.model.moe import Router
    for m in model.modules():
        if isinstance(m, Router):
            with torch.no_grad():
                m.e_score_correction_bias.copy_(torch.arange(m.e_score_correction_bias.numel()) * gap)
    return model


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_triton_verification_matches_eager_on_gpu(fp8):
    """A bf16 CUDA model (and its FP8-resident twin): the graphed runner's verification forwards of T = 2 .. 4
    tokens (TritonStep.verify, captured) against eager forwards of the same tokens, with the rollbacks
    verification makes, across the SWA window; then speculative generate() gives the eager greedy tokens."""
    from mimo_flash.generation import engine
    from mimo_flash.generation.cache import MAIN
    from mimo_flash.generation.engine import prefill
    from mimo_flash.generation.runner import Runner
    from mimo_flash.quant import quantize_model_

    model = separated_routing(tiny_model(seed=2, hidden_size=192, moe_intermediate_size=80))
    if fp8:
        quantize_model_(model)
    model = model.to(device="cuda", dtype=torch.bfloat16)
    cfg, P, S = model.config, 20, 128
    ids = torch.randint(0, cfg.vocab_size, (1, P), generator=torch.Generator().manual_seed(2)).cuda()
    with override(decode_triton_verify=True):  # (off by default: see options.decode_triton_verify)
        graphed = GraphRunner(model, KVCache(cfg, 1, S, device="cuda", dtype=torch.bfloat16, slack=6), S)
    eager = Runner(model, KVCache(cfg, 1, S, device="cuda", dtype=torch.bfloat16, slack=6), S)
    g = torch.Generator().manual_seed(3)
    n = P
    with torch.no_grad():
        prefill(eager, ids, None, 8, keep_hidden=False)
        prefill(graphed, ids, None, 8, keep_hidden=False)
        for i in range(12):
            T = (2, 4, 3, 4)[i % 4]
            toks = torch.randint(0, cfg.vocab_size, (1, T), generator=g).cuda()
            pos = (n + torch.arange(T, device="cuda"))[None]
            a, ha = graphed.main(toks, pos, None, n + T, graph=True)
            b, hb = eager.main(toks, pos, None, n + T)
            for x, y in ((a, b), (ha, hb)):
                assert float((x.float() - y.float()).norm() / y.float().norm()) < 3e-2
            n += 1 + i % T
            for c in (eager.cache, graphed.cache):
                c.rollback(torch.tensor([n], device="cuda"), MAIN)
    assert graphed.triton and set(graphed._triton_step._multi) == {2, 3, 4} and not graphed.notes
    prompt = ids[:, :10]
    plain = generate(model, prompt, max_new_tokens=30, eos_token_id=[], cuda_graphs=False)
    with override(decode_triton_verify=True):
        out, stats = generate(model, prompt, max_new_tokens=30, eos_token_id=[], num_speculative_tokens=3,
                              return_stats=True)
    (r,) = [r for r in engine._RUNNERS[model].values() if r._triton_step is not None]
    assert stats.notes == [] and 4 in r._triton_step._multi
    assert (out == plain).float().mean() > 0.9  # bf16: a near tie may flip a token, and the rest follows


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_triton_drafting_matches_eager_on_gpu(fp8):
    """A bf16 CUDA model with 3 MTP layers (and its FP8-resident twin): the graphed runner's MTP forwards of
    K + 1 + k columns (TritonStep.draft, captured), the first ones masked as a speculative step masks them,
    against eager MTP forwards, with the rollbacks a step makes, across the MTP rings; then speculative generate()
    gives the eager greedy tokens with every draft through draft()."""
    from mimo_flash.generation import engine
    from mimo_flash.generation.cache import mtp_group
    from mimo_flash.generation.runner import Runner
    from mimo_flash.quant import quantize_model_

    K = 3
    model = separated_routing(tiny_model(seed=2, hidden_size=192, moe_intermediate_size=80, num_nextn_predict_layers=K))
    if fp8:
        quantize_model_(model)
    model = model.to(device="cuda", dtype=torch.bfloat16)
    cfg, S = model.config, 128
    caches = [KVCache(cfg, 1, S, device="cuda", dtype=torch.bfloat16, num_mtp=K, slack=2 * K) for _ in range(2)]
    graphed, eager = GraphRunner(model, caches[0], S), Runner(model, caches[1], S)
    g = torch.Generator().manual_seed(3)
    n, n_prev = 6, 0
    with torch.no_grad():
        for i in range(10):
            for k in range(K):
                T = K + 1 + k
                pos = (n - T + torch.arange(T, device="cuda"))[None]
                valid = (pos >= n_prev - k) & (pos >= 0)
                ids = torch.randint(0, cfg.vocab_size, (1, T), generator=g).cuda()
                h = torch.randn(1, T, cfg.hidden_size, generator=g).to("cuda", torch.bfloat16)
                la, ha = graphed.mtp(k, ids, h, pos, valid, graph=True)
                lb, hb = eager.mtp(k, ids, h, pos, valid)
                for x, y in ((la, lb), (ha[valid], hb[valid])):
                    assert float((x.float() - y.float()).norm() / y.float().norm()) < 3e-2
            n_prev, n = n, n + 1 + i % (K + 1)
            for j in range(K):
                for c in caches:
                    c.rollback(torch.tensor([n_prev - j], device="cuda"), mtp_group(j))
    assert graphed.triton_draft and set(graphed._triton_step._drafts) == {(0, 4), (1, 5), (2, 6)}
    assert not graphed.notes and not any(key[0] == "mtp" for key in graphed.fns)
    ids = torch.randint(0, cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(2)).cuda()
    plain = generate(model, ids, max_new_tokens=30, eos_token_id=[], cuda_graphs=False)
    out, stats = generate(model, ids, max_new_tokens=30, eos_token_id=[], num_speculative_tokens=K,
                          return_stats=True)
    (r,) = [r for r in engine._RUNNERS[model].values() if r._triton_step is not None]
    assert stats.notes == [] and (0, 4) in r._triton_step._drafts
    assert (out == plain).float().mean() > 0.9  # bf16: a near tie may flip a token, and the rest follows


def test_triton_step_failure_falls_back_to_the_compiled_step(monkeypatch):
    from mimo_flash.generation import triton_step

    model = tiny_model(vocab_size=6)
    ids = torch.randint(0, 6, (1, 9), generator=torch.Generator().manual_seed(10))
    plain = generate(model, ids, max_new_tokens=12, eos_token_id=[])

    def broken(self, ids, pos, bucket, token=None):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(triton_step.TritonStep, "__call__", broken)
    with override(decode_triton="always"), pytest.warns(UserWarning, match="kernel launch failed"):
        out, stats = generate(model, ids, max_new_tokens=12, eos_token_id=[], cuda_graphs=True, return_stats=True)
    assert torch.equal(out, plain)
    # the graphed greedy loop kept going, without Triton: the one fallback is the Triton step's
    assert len(stats.notes) == 1 and "Triton decode step failed" in stats.notes[0]


def test_triton_verification_and_drafting_failures_fall_back_and_keep_the_one_token_step(monkeypatch):
    from mimo_flash.generation import engine, triton_step

    model = tiny_model(vocab_size=6, seed=1)
    assert model.config.num_nextn_predict_layers >= 2
    ids = torch.randint(0, 6, (1, 9), generator=torch.Generator().manual_seed(10))
    plain = generate(model, ids, max_new_tokens=12, eos_token_id=[])

    def broken_verify(self, ids, pos, bucket):
        raise RuntimeError("verify kernel failed")

    def broken_draft(self, k, ids, h_prev, pos, valid):
        raise RuntimeError("draft kernel failed")

    monkeypatch.setattr(triton_step.TritonStep, "verify", broken_verify)
    monkeypatch.setattr(triton_step.TritonStep, "draft", broken_draft)
    with override(decode_triton="always", decode_triton_verify=True), pytest.warns(UserWarning, match="kernel failed"):
        out, stats = generate(model, ids, max_new_tokens=12, eos_token_id=[], num_speculative_tokens=2,
                              cuda_graphs=True, return_stats=True)
    assert torch.equal(out, plain)
    assert len(stats.notes) == 2
    assert any("Triton verification failed" in n and "verify kernel failed" in n for n in stats.notes)
    assert any("Triton MTP drafting failed" in n and "draft kernel failed" in n for n in stats.notes)
    (r,) = engine._RUNNERS[model].values()
    # the one-token step stays; verification and drafting take the compiled path
    assert r.triton and not r.triton_verify and not r.triton_draft
    assert any(key[0] == "main" for key in r.fns) and any(key[0] == "mtp" for key in r.fns)
