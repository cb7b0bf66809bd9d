"""The FP8 CUDA backends (torch._scaled_mm, the Triton FP8 GEMV/GEMM and grouped-expert kernels, the W8A8
activation quantizer and grouped experts) against their references, and an FP8-resident model generating on the
GPU. Skipped without a GPU.

    pytest tests/test_quant_gpu.py -m gpu -q
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model
from mimo_flash.quant import fp8_experts, fp8_linear, quantize, quantize_model_
from mimo_flash.quant.gemm import scaled_mm_supported

pytestmark = pytest.mark.gpu
DEV = "cuda"


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def weight(N, K, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = torch.randn(N, K, device=DEV, generator=g) * 0.02
    return quantize(w, (128, 128))


@pytest.mark.parametrize("M,N,K", [(4096, 12288, 4096), (300, 768, 4096), (129, 1536, 2048)])
def test_scaled_mm_matches_its_w8a8_reference(M, N, K):
    q, s = weight(N, K, M)
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    assert scaled_mm_supported(x, q), "this H200 / torch should take the block-scaled recipe"
    y = fp8_linear(x, q, s, "scaled_mm")
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    assert rel(y, fp8_linear(x, q, s, "w8a8")) < 1e-2  # same quantized operands: fp32 sums, bf16 output
    assert rel(y, fp8_linear(x.float(), q, s, "reference")) < 5e-2  # the activations' FP8 rounding on top


@pytest.mark.parametrize("M", [1, 2, 8, 17, 64])
@pytest.mark.parametrize("N,K", [(12288, 4096), (200, 300)])
def test_triton_fp8_gemm_matches_reference(M, N, K):
    q, s = weight(N, K, M + N)
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    y = fp8_linear(x, q, s, "triton")
    assert rel(y, fp8_linear(x.float(), q, s, "reference")) < 1e-2  # bf16 output rounding


def experts_case(T: int, E: int = 32, D: int = 1024, I: int = 512, k: int = 8):
    """FP8 experts (gate_up, its scales, down, its scales) and T bf16 tokens routed to k of them with weights."""
    g = torch.Generator(device=DEV).manual_seed(T)
    gu, gus = quantize(torch.randn(E, 2 * I, D, device=DEV, generator=g) * 0.02, (128, 128))
    dn, dns = quantize(torch.randn(E, D, I, device=DEV, generator=g) * 0.02, (128, 128))
    x = torch.randn(T, D, device=DEV, generator=g).bfloat16()
    idx = torch.rand(T, E, device=DEV, generator=g).topk(k, -1).indices
    w = torch.rand(T, k, device=DEV, generator=g)
    return (gu, gus, dn, dns), x, idx, w


@pytest.mark.parametrize("T", [1, 16, 512])
def test_triton_fp8_experts_match_reference(T):
    (gu, gus, dn, dns), x, idx, w = experts_case(T)
    ref = fp8_experts(x.float(), idx, w, gu, gus, dn, dns, "reference")
    assert rel(fp8_experts(x, idx, w, gu, gus, dn, dns, "triton"), ref) < 1e-2


@pytest.mark.parametrize("T", [16, 512])
def test_triton_fp8_experts_leave_out_absent_tokens(T):
    """Tokens that are not there (routing weight 0): outputs exactly 0, the others' unchanged bit for bit."""
    (gu, gus, dn, dns), x, idx, w = experts_case(T)
    dead = torch.arange(T, device=DEV) % 3 == 1
    got = fp8_experts(x, idx, w, gu, gus, dn, dns, "triton")
    got_d = fp8_experts(x, idx, torch.where(dead[:, None], 0.0, w), gu, gus, dn, dns, "triton")
    assert (got_d[dead] == 0).all() and torch.equal(got_d[~dead], got[~dead])


@pytest.mark.parametrize("E,block_m,rows", [(256, 64, 65536), (256, 16, 64), (64, 64, 8192), (5, 16, 40)])
def test_tile_schedule_kernel_is_the_torch_schedule(E, block_m, rows):
    from mimo_flash.ops.kernels.moe import tile_schedule, tile_schedule_reference
    g = torch.Generator(device=DEV).manual_seed(E + rows)
    counts = torch.bincount(torch.randint(0, E, (rows,), device=DEV, generator=g), minlength=E)
    counts[::7] = 0  # experts without rows
    for got, want in zip(tile_schedule(counts, block_m, rows), tile_schedule_reference(counts, block_m, rows),
                         strict=True):
        assert torch.equal(got, want)


def test_activation_quantizer_is_the_reference_bit_for_bit():
    from mimo_flash.quant.blocks import quantize_activations
    from mimo_flash.quant.triton_fp8 import quantize_activations_fast

    g = torch.Generator(device=DEV).manual_seed(0)
    for M, K in ((1, 4096), (4099, 2048), (64, 300)):
        x = (torch.randn(M, K, device=DEV, generator=g) * torch.logspace(-4, 4, K, device=DEV)).bfloat16()
        x[0, :128] = 0
        q, s = quantize_activations_fast(x)
        qr, sr = quantize_activations(x)
        assert s.stride() == (1, M)  # torch._scaled_mm's layout for scale_a
        bad = (q.view(torch.uint8) != qr.view(torch.uint8)).nonzero()
        where = [(tuple(i), float(x[i[0], i[1]]), float(q[i[0], i[1]].float()), float(qr[i[0], i[1]].float()),
                  float(sr[i[0], i[1] // 128])) for i in bad[:5].tolist()]
        assert torch.equal(s, sr), (M, K, (s != sr).sum().item())
        assert len(bad) == 0, (M, K, len(bad), where)
    # the GPU's own cast does the rounding: rows of amax 448 (scale 1) holding every FP8 value, every midpoint
    # between neighbours (ties to even) and the floats just beside each midpoint
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[vals.isfinite()].sort().values
    mids = (vals[1:] + vals[:-1]) / 2
    grid = torch.cat([vals, mids, mids.nextafter(torch.tensor(1e9)), mids.nextafter(torch.tensor(-1e9))])
    grid = torch.cat([grid, torch.full((-grid.numel() % 127,), 1.0)]).view(-1, 127)
    grid = torch.cat([grid, torch.full((grid.shape[0], 1), 448.0)], 1).to(DEV)
    q, s = quantize_activations_fast(grid)
    qr, sr = quantize_activations(grid)
    assert (s == 1).all() and torch.equal(q.view(torch.uint8), qr.view(torch.uint8))


@pytest.mark.parametrize("T", [64, 2048])
def test_w8a8_experts_match_the_recipe_and_the_reference(T):
    """The W8A8 grouped experts against the same recipe written with the w8a8 linear per expert (quantized
    operands, fp32 sums), and against the unquantized-activation reference (the activations' FP8 rounding)."""
    from mimo_flash.quant.gemm import experts_w8a8, linear_w8a8

    E, D, I = 32, 1024, 512
    (gu, gus, dn, dns), x, idx, w = experts_case(T, E, D, I)
    recipe = torch.zeros(T, D, device=DEV)
    for e in range(E):
        tok, slot = torch.where(idx == e)
        h = linear_w8a8(x[tok], gu[e], gus[e]).float()
        a = (torch.nn.functional.silu(h[:, :I]) * h[:, I:] * w[tok, slot, None]).bfloat16()
        recipe.index_add_(0, tok, linear_w8a8(a, dn[e], dns[e]).float())
    tiles = [None, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4)]
    for tile in tiles:
        got = experts_w8a8(x, idx, w, gu, gus, dn, dns, tile)
        # (the gate/up outputs, rounded to bf16 after sums in another order, are quantized again: a one-ulp
        # difference there moves some activations to the next FP8 value, 1-2% of the output in all)
        assert got.dtype == torch.bfloat16 and rel(got, recipe) < 3e-2
    ref = fp8_experts(x.float(), idx, w, gu, gus, dn, dns, "reference")
    assert rel(fp8_experts(x, idx, w, gu, gus, dn, dns, "w8a8"), ref) < 8e-2


def test_dispatch_quantizer_is_the_gathered_quantization_bit_for_bit():
    from mimo_flash.ops.moe import sort_by_expert
    from mimo_flash.quant.blocks import quantize_activations
    from mimo_flash.quant.triton_fp8 import quantize_dispatch

    _, x, idx, _ = experts_case(2051)
    _, inv, _, tok, _ = sort_by_expert(idx, 32)
    xq, xs = quantize_dispatch(x, inv, idx.shape[1])
    qr, sr = quantize_activations(x[tok])
    assert xs.stride() == (1, tok.numel())
    assert torch.equal(xq.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(xs, sr)


def test_fp8_model_on_gpu_agrees_with_cpu_and_generates():
    model = tiny_model(num_nextn_predict_layers=1)
    quantize_model_(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0))
    cpu = model(ids).logits
    gpu = copy.deepcopy(model).to(DEV, torch.bfloat16)
    logits = gpu(ids.to(DEV)).logits.float().cpu()
    assert rel(logits, cpu) < 3e-2  # bf16 activations, W8A8 prefill products


def test_fp8_trained_model_generates_the_cpu_tokens_on_gpu():
    """generate() on CUDA (graph path, FP8 Triton decode products) gives the greedy tokens of the CPU fp32 run
    on a model confident enough that bf16 rounding does not flip them."""
    from test_quant import _trained_tiny

    model, data, _ = _trained_tiny()
    quantize_model_(model)
    prompt = data[:2, :10]
    cpu = model.generate(prompt, max_new_tokens=40, eos_token_id=[])
    gpu = copy.deepcopy(model).to(DEV, torch.bfloat16)
    graphs = gpu.generate(prompt.to(DEV), max_new_tokens=40, eos_token_id=[])
    eager = gpu.generate(prompt.to(DEV), max_new_tokens=40, eos_token_id=[], cuda_graphs=False)
    assert torch.equal(graphs.cpu(), cpu) and torch.equal(eager.cpu(), cpu)
