"""quant/: block format, FP8 products (reference, W8A8, Triton in the interpreter), FP8-resident modules and model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import run_in_triton_interpreter, tiny_model
from mimo_flash.ops.moe import experts_reference as bf16_experts_reference
from mimo_flash.quant import (FP8, FP8Experts, FP8Linear, dequantize, fp8_experts, fp8_linear, quantize,
                              quantize_activations, quantize_model_)
from mimo_flash.quant.blocks import dequantize_activations, dequantize_fast


def loop_dequant(q: torch.Tensor, s: torch.Tensor, b: int = 128) -> torch.Tensor:
    """The block format written as loops over blocks, in float64: an oracle independent of quant/."""
    out = torch.empty(q.shape, dtype=torch.float64)
    R, C = q.shape
    for i in range(math.ceil(R / b)):
        for j in range(math.ceil(C / b)):
            blk = (slice(i * b, (i + 1) * b), slice(j * b, (j + 1) * b))
            out[blk] = q[blk].double() * float(s[i, j])
    return out


def rand_fp8(shape, seed):
    """An FP8 weight and per-block scales, all distinct and far from 1 (so a scale applied to the wrong block shows)."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(shape, generator=g) * 64).clamp(-448, 448).to(FP8)
    grid = (*shape[:-2], math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128))
    s = (torch.randperm(math.prod(grid), generator=g).float() + 1).view(grid) * 1e-3
    return q, s


# ----------------------------------------------------------------------------------------------- format
def test_quantize_activations_per_token_group():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 300, generator=g) * torch.logspace(-3, 2, 300)  # groups of very different magnitude
    x[1, 128:256] = 0
    xq, s = quantize_activations(x)
    assert xq.dtype == FP8 and s.shape == (3, 3) and xq.shape == x.shape
    for m in range(3):
        for j in range(3):
            grp = x[m, j * 128:(j + 1) * 128]
            amax = grp.abs().max().item()
            if amax == 0:
                assert s[m, j] == 1 and not xq[m, j * 128:(j + 1) * 128].float().any()
            else:
                assert s[m, j].item() == pytest.approx(amax / 448, rel=1e-6)
                assert xq[m, j * 128:(j + 1) * 128].float().abs().max() == 448
    back = dequantize_activations(xq, s)
    err = (back - x).abs()
    assert (err <= x.abs() * 2**-4 + s.repeat_interleave(128, -1)[:, :300] * 2**-9).all()


@pytest.mark.parametrize("shape", [(200, 300), (128, 256), (5, 7)])
def test_dequantize_fast_equals_the_block_loops(shape):
    q, s = rand_fp8(shape, 1)
    ref = loop_dequant(q, s)
    assert torch.equal(dequantize_fast(q, s, torch.float32), ref.float())
    assert torch.equal(dequantize(q, s, (128, 128)), ref.float())


def test_quantize_round_trip_error_is_within_fp8_precision():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(300, 260, generator=g) * 0.02
    w[:128, :128] *= 1e-3  # a block of small weights keeps its relative precision (real amax/448 scales)
    q, s = quantize(w, (128, 128))
    assert s.shape == (3, 3)
    back = loop_dequant(q, s).float()
    blockscale = s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :260]
    assert ((back - w).abs() <= w.abs() * 2**-4 + blockscale * 2**-9).all()


# ---------------------------------------------------------------------------------------------- products
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_reference_is_the_dequantized_product(dtype):
    q, s = rand_fp8((200, 300), 4)
    x = torch.randn(2, 3, 300, generator=torch.Generator().manual_seed(5)).to(dtype)
    y = fp8_linear(x, q, s, "reference")
    assert y.dtype == dtype and y.shape == (2, 3, 200)
    assert torch.equal(y, F.linear(x, loop_dequant(q, s).to(dtype)))


def test_fp8_linear_w8a8_is_close_to_the_unquantized_activation_product():
    q, s = rand_fp8((256, 384), 6)
    x = torch.randn(16, 384, generator=torch.Generator().manual_seed(7))
    ref = (x.double() @ loop_dequant(q, s).T)
    y = fp8_linear(x, q, s, "w8a8").double()
    rel = ((y - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 4e-2  # the activations' rounding (3 mantissa bits) shows, and no more than that


def test_fp8_linear_rejects_unknown_backend():
    q, s = rand_fp8((16, 16), 0)
    with pytest.raises(ValueError, match="unknown fp8_linear backend 'nope'"):
        fp8_linear(torch.zeros(1, 16), q, s, "nope")


def _routing(N, E, k, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(N)])  # expert E-1 never chosen
    w = torch.rand(N, k, generator=g)
    return idx, w


def test_fp8_experts_reference_is_the_dequantized_experts():
    E, D, I, N, k = 5, 160, 136, 9, 2
    gu, gus = rand_fp8((E, 2 * I, D), 8)
    dn, dns = rand_fp8((E, D, I), 9)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(10)) * 1e-2
    idx, w = _routing(N, E, k, 11)
    want = bf16_experts_reference(x, idx, w, torch.stack([loop_dequant(gu[e], gus[e]).float() for e in range(E)]),
                                  torch.stack([loop_dequant(dn[e], dns[e]).float() for e in range(E)]))
    got = fp8_experts(x, idx, w, gu, gus, dn, dns, "reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


_TRITON = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import math
import torch
import torch.nn.functional as F
from mimo_flash.quant import FP8, fp8_experts, fp8_linear
from mimo_flash.ops.kernels.moe import tile_schedule, tile_schedule_reference

def rand_fp8(shape, seed):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(shape, generator=g) * 64).clamp(-448, 448).to(FP8)
    grid = (*shape[:-2], math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128))
    return q, (torch.randperm(math.prod(grid), generator=g).float() + 1).view(grid) * 1e-3

def deq(q, s):  # the block format with whole-tensor ops, in float64
    R, C = q.shape[-2:]
    return q.double() * s.double().repeat_interleave(128, -2)[..., :R, :].repeat_interleave(128, -1)[..., :C]

torch.set_num_threads(1)
# decode rows: 1 (multiply-and-sum), 5 and 17 (tensor-core tiles); partial edge blocks in N and K
for M, N, K in ((1, 200, 300), (5, 130, 256), (17, 64, 100)):
    q, s = rand_fp8((N, K), M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(N))
    ref = x.double() @ deq(q, s).T
    y = fp8_linear(x, q, s, "triton")
    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    assert y.shape == (M, N) and err < 1e-5, (M, N, K, err)

# the tile schedule: every row of every expert in exactly one tile, unused tiles marked -1
counts = torch.tensor([3, 0, 40, 1, 0, 17])
te, tr, end = tile_schedule(counts, 16, int(counts.sum()))
seen = torch.zeros(int(counts.sum()), dtype=torch.long)
starts = torch.cumsum(counts, 0) - counts
for e, r in zip(te.tolist(), tr.tolist(), strict=True):
    if e >= 0:
        assert starts[e] <= r < end[e]
        seen[r:min(r + 16, int(end[e]))] += 1
assert (seen == 1).all() and (te == -1).sum() > 0
# the one-kernel schedule is the torch one: empty experts, E not a power of two, several programs' tiles
g = torch.Generator().manual_seed(7)
for E, bm, extra in ((6, 16, 0), (3, 64, 5), (37, 16, 100), (300, 64, 3000)):
    counts = torch.randint(0, 3 * bm, (E,), generator=g)
    counts[::4] = 0
    for a, b in zip(tile_schedule(counts, bm, int(counts.sum()) + extra),
                    tile_schedule_reference(counts, bm, int(counts.sum()) + extra), strict=True):
        assert a.dtype == b.dtype == torch.int32 and torch.equal(a, b), (E, bm, a, b)

# grouped experts: some experts get no token, partial blocks in I and D
E, D, I, N, k = 6, 160, 80, 11, 3
gu, gus = rand_fp8((E, 2 * I, D), 1)
dn, dns = rand_fp8((E, D, I), 2)
g = torch.Generator().manual_seed(3)
idx = torch.stack([torch.randperm(E - 2, generator=g)[:k] for _ in range(N)])
w = torch.rand(N, k, generator=g)
x = torch.randn(N, D, generator=g) * 1e-2
ref = ref_e = torch.zeros(N, D, dtype=torch.float64)
for n in range(N):
    for j in range(k):
        e = int(idx[n, j])
        h = x[n].double() @ deq(gu[e], gus[e]).T
        a = F.silu(h[:I]) * h[I:]
        ref[n] += w[n, j].double() * (a @ deq(dn[e], dns[e]).T)
got = fp8_experts(x, idx, w, gu, gus, dn, dns, "triton")
err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
assert err < 1e-5, err
# tokens that are not there (routing weight 0): an expert that only they chose is never read (its weights NaN
# here), their outputs are 0 and the other tokens' are unchanged bit for bit
dead = torch.zeros(N, dtype=torch.bool)
dead[[1, 4, 5]] = True
idx_d = idx.clone()
idx_d[1] = torch.tensor([E - 1, E - 2, 0])
w_d = torch.where(dead[:, None], 0.0, w)
gus_nan = gus.clone()
gus_nan[E - 2:] = float("nan")
got_d = fp8_experts(x, idx_d, w_d, gu, gus_nan, dn, dns, "triton")
assert torch.equal(got_d[dead], torch.zeros(3, D)), got_d[dead]
assert torch.equal(got_d[~dead], got[~dead])

# W8A8 (prefill): the activation quantizer is blocks.quantize_activations bit for bit: values over 12 decades,
# an all-zero group, a partial last group, and rows of amax 448 (scale 1) holding every FP8 value, every
# midpoint between neighbours (ties go to even) and the floats just beside each midpoint
from mimo_flash.quant.blocks import dequantize_activations, quantize_activations
from mimo_flash.quant.triton_fp8 import quantize_activations_fast, w8a8_grouped_gemm
xw = torch.randn(7, 300, generator=g) * torch.logspace(-6, 6, 300)
xw[0, :128] = 0
vals = torch.arange(256, dtype=torch.uint8).view(FP8).float()
vals = vals[vals.isfinite()].sort().values
mids = (vals[1:] + vals[:-1]) / 2
grid = torch.cat([vals, mids, mids.nextafter(torch.tensor(1e9)), mids.nextafter(torch.tensor(-1e9))])
grid = torch.cat([grid, torch.full((-grid.numel() % 127,), 1.0)]).view(-1, 127)
grid = torch.cat([grid, torch.full((grid.shape[0], 1), 448.0)], 1)
for xa in (xw, grid):
    for major in (True, False):
        q8, sc = quantize_activations_fast(xa, scales_column_major=major)
        qr, sr = quantize_activations(xa)
        assert torch.equal(q8.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(sc, sr)
assert (quantize_activations_fast(grid)[1] == 1).all()

# the grouped FP8 x FP8 product: each row's dequantized activations times its expert's dequantized weight
# (K = 304: a last K step of 48 columns, past which TMA reads zeros; N = 200: the last N tile of an expert reads the
# next expert's weight rows and stores none of them; a 256-column tile spans two weight blocks)
counts = torch.tensor([5, 0, 37, 2])
for K, tile in ((304, dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2)), (304, dict(BLOCK_M=32, BLOCK_N=128)),
                (256, dict(BLOCK_M=16, BLOCK_N=256))):
    wq, wsc = rand_fp8((4, 200, K), 4)
    xq8, xsc = quantize_activations_fast(torch.randn(int(counts.sum()), K, generator=g))
    y = w8a8_grouped_gemm(xq8, xsc, wq, wsc, counts, torch.float32, tile)
    xd = dequantize_activations(xq8, xsc).double()
    e_of = torch.repeat_interleave(torch.arange(4), counts)
    ref = torch.stack([xd[r] @ deq(wq[e], wsc[e]).T for r, e in enumerate(e_of.tolist())])
    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    assert y.shape == (int(counts.sum()), 200) and err < 1e-6, (tile, err)

# the experts' dispatch quantized in place (each token written to its sorted rows) is quantizing the gathered rows
from mimo_flash.ops.moe import sort_by_expert
from mimo_flash.quant.triton_fp8 import quantize_dispatch, swiglu_quantize
T4, k4 = 23, 3
x4 = torch.randn(T4, 300, generator=g).half()
order4, inv4, counts4, tok4, _ = sort_by_expert(torch.rand(T4, 5, generator=g).topk(k4, -1).indices, 5)
xq4, xs4 = quantize_dispatch(x4, inv4, k4)
qr, sr = quantize_activations(x4[tok4])
assert torch.equal(xq4.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(xs4, sr)
assert xs4.stride() == (1, T4 * k4)

# the experts' activation quantized in the same pass as its SwiGLU and routing weight: what quantizing the unfused
# activation gives (a 1-ulp difference of silu may move a rare value across a rounding boundary)
h = torch.randn(37, 2 * 200, generator=g) * 3
wr = torch.rand(37, generator=g)
aq, asc = swiglu_quantize(h, wr)
qr, sr = quantize_activations(F.silu(h[:, :200]) * h[:, 200:] * wr[:, None])
assert aq.shape == (37, 200) and asc.shape == (37, 2)
torch.testing.assert_close(asc, sr, rtol=1e-6, atol=0)
assert (aq.view(torch.uint8) == qr.view(torch.uint8)).float().mean() > 0.999
torch.testing.assert_close(dequantize_activations(aq, asc), dequantize_activations(qr, sr), rtol=0.07, atol=0)

# the W8A8 experts: against the same recipe in float64 (activations quantized per token and 1x128 group before
# each projection; a rounding tie may fall the other way), and against the unquantized-activation product,
# from which they differ by the activations' FP8 rounding
xd = dequantize_activations(*quantize_activations(x)).double()
ref_q = torch.zeros(N, D, dtype=torch.float64)
for n in range(N):
    for j in range(k):
        e = int(idx[n, j])
        h = xd[n] @ deq(gu[e], gus[e]).T
        a = (w[n, j].double() * F.silu(h[:I]) * h[I:]).float()
        ref_q[n] += dequantize_activations(*quantize_activations(a[None]))[0].double() @ deq(dn[e], dns[e]).T
got = fp8_experts(x, idx, w, gu, gus, dn, dns, "w8a8")
err_q = ((got.double() - ref_q).norm() / ref_q.norm()).item()
err = ((got.double() - ref_e).norm() / ref_e.norm()).item()
assert err_q < 1e-3 and 1e-3 < err < 8e-2, (err_q, err)
print("ok")
"""


def test_triton_fp8_kernels_in_the_interpreter():
    run_in_triton_interpreter(_TRITON)


# ----------------------------------------------------------------------------------------------- modules
def _expected_swaps(model) -> set[str]:
    """Written out from SPEC.md's FP8 section: q/k/v (however the attention holds them: every projection but
    o_proj), the dense SwiGLU projections, the experts; not eh_proj (stored unquantized, as vLLM and SGLang
    load it)."""
    names = set()
    for prefix, layers in (("model.layers", model.model.layers), ("model.mtp.layers", model.model.mtp.layers)):
        for i, layer in enumerate(layers):
            base = f"{prefix}.{i}"
            names |= {f"{base}.self_attn.{n}" for n, m in layer.self_attn.named_children()
                      if isinstance(m, nn.Linear) and n != "o_proj"}
            if hasattr(layer.mlp, "experts"):
                names.add(f"{base}.mlp.experts")
            else:
                names |= {f"{base}.mlp.{n}" for n, m in layer.mlp.named_children() if isinstance(m, nn.Linear)}
    return names


QKV = "model.layers.0.self_attn.qkv_proj"  # the fused q/k/v projection (q, k, v rows in that order)


def test_quantize_model_swaps_exactly_the_release_tensors():
    model = tiny_model(num_nextn_predict_layers=2)
    before = {n: type(m) for n, m in model.named_modules()}
    expected = _expected_swaps(model)
    swapped = quantize_model_(model)
    assert set(swapped) == expected and len(swapped) == len(set(swapped))
    assert {QKV, "model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj"} <= expected
    assert not any(n.endswith("eh_proj") for n in swapped) and any(n.endswith("mlp.experts") for n in swapped)
    for n, m in model.named_modules():
        if n in swapped:
            assert isinstance(m, FP8Linear if issubclass(before[n], nn.Linear) else FP8Experts), n
        elif n in before:
            assert type(m) is before[n], n  # o_proj, lm_head, embeddings, router, norms untouched
    sd = model.state_dict()
    assert sd["model.layers.0.self_attn.o_proj.weight"].dtype == torch.float32
    assert sd["lm_head.weight"].dtype == torch.float32 and sd["model.embed_tokens.weight"].dtype == torch.float32
    assert sd[QKV + ".weight"].dtype == FP8 and sd[QKV + ".weight_scale_inv"].dtype == torch.float32
    model.to(torch.bfloat16)  # a dtype cast keeps FP8 weights FP8 and their scales fp32
    assert model.get_submodule(QKV).weight.dtype == FP8
    assert model.get_submodule(QKV).weight_scale_inv.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16


def dequantized_twin(fp8_model, like):
    """`like` (the original float model) with every FP8 weight of fp8_model dequantized into it."""
    twin = copy.deepcopy(like)
    with torch.no_grad():
        for n, m in fp8_model.named_modules():
            if isinstance(m, FP8Linear):
                twin.get_submodule(n).weight.copy_(loop_dequant(m.weight, m.weight_scale_inv))
            elif isinstance(m, FP8Experts):
                t = twin.get_submodule(n)
                for p in ("gate_up_proj", "down_proj"):
                    q, s = getattr(m, p), getattr(m, p + "_scale_inv")
                    getattr(t, p).copy_(torch.stack([loop_dequant(q[e], s[e]) for e in range(q.shape[0])]))
    return twin


def test_fp8_resident_model_equals_the_dequantized_model_on_cpu():
    """CPU: weights dequantized per use, activations not quantized -> the same fp32 numbers as the dequantized
    model (bit for bit), and within bf16 rounding in bf16."""
    model = tiny_model(num_nextn_predict_layers=1)
    fp8 = copy.deepcopy(model)
    quantize_model_(fp8)
    twin = dequantized_twin(fp8, model)
    ids = torch.randint(0, model.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    a = fp8(ids, attention_mask=mask).logits
    b = twin(ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    # and quantization did change the model (the comparison is not between two copies of one thing)
    assert (model(ids, attention_mask=mask).logits - b).abs().max() > 1e-4
    a16 = fp8.to(torch.bfloat16)(ids, attention_mask=mask).logits.float()
    b16 = twin.to(torch.bfloat16)(ids, attention_mask=mask).logits.float()
    assert (a16 - b16).abs().max() < 0.05 * b16.abs().max()


def _trained_tiny(steps: int = 60):
    """The tiny model fitted to a fixed token pattern, so its next-token choices are confident (greedy
    agreement is meaningful; on random weights the top two logits are often a rounding apart). At lr 1e-2 the
    loss after 60 steps swung between 0.11 and 1.3 with the thread count and CPU (greedy then left the cycle, and
    FP8 flipped its near-ties); at 3e-3 it was 0.028 at one and two threads, the top two logits >= 4.5 apart."""
    torch.manual_seed(0)
    model = tiny_model(seed=1, vocab_size=64, num_nextn_predict_layers=0).train()
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 64, (1, 24), generator=g).repeat(4, 3)  # [4, 72]: a 24-token cycle
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        out = model(data[:, :-1])
        loss = F.cross_entropy(out.logits.reshape(-1, 64), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), data, loss.item()


def test_fp8_resident_greedy_agrees_with_float_model_on_a_trained_model():
    model, data, loss = _trained_tiny()
    assert loss < 0.1  # it learned the cycle
    fp8 = copy.deepcopy(model)
    quantize_model_(fp8)
    prompt = data[:1, :10]
    a = model.generate(prompt, max_new_tokens=40, eos_token_id=[])
    b = fp8.generate(prompt, max_new_tokens=40, eos_token_id=[])
    assert torch.equal(a, data[:1, :50])  # greedy follows the cycle
    assert torch.equal(a, b)


def test_saving_an_fp8_resident_model_is_refused_clearly(tmp_path):
    from mimo_flash.checkpoint import CheckpointError

    model = tiny_model()
    quantize_model_(model)
    with pytest.raises(CheckpointError, match="FP8-resident weights .*qkv_proj.weight"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
