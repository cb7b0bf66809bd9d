"""The CUDA fast paths (cuDNN and compiled FlexAttention, grouped-GEMM experts, the small ops, the kernels' launcher)
against the fp64 reference, forward and backward, on fresh random inputs. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.ops import norm, rope, swiglu
from mimo_flash.ops.attention import _FAST, AttnMeta, attention, attention_cudnn, attention_flex, attention_triton
from mimo_flash.ops.moe import experts, gather_sum, route
from mimo_flash.options import override

pytestmark = pytest.mark.gpu
DEV = "cuda"


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def plain_meta(B, T):
    pos = torch.arange(T, device=DEV).expand(B, T)
    return AttnMeta(pos, pos, plain=True)


def packed_meta(lengths, pad=0):
    pos = torch.cat([torch.zeros(pad, dtype=torch.long)] + [torch.arange(n) for n in lengths])[None]
    seg = torch.cat([-(torch.arange(pad) + 2)] + [torch.full((n,), d) for d, n in enumerate(lengths)])[None]
    return AttnMeta(pos.to(DEV), pos.to(DEV), seg.to(DEV), seg.to(DEV), aligned=True, plain=False)


def cache_meta(Tq, Tk):
    pos = torch.arange(Tk, device=DEV)[None]
    return AttnMeta(pos[:, Tk - Tq:], pos, aligned=False)


def attn_grads(fn, meta, H, Hkv, window, with_sink, seed, dtype=torch.bfloat16, D=192, Dv=128, bthd=False):
    """Run fn (an attention backend) in `dtype` and the reference in fp64 on the same values
    (bthd: fn gets q, k, v as [B, H, T, d] views of [B, T, H, d] tensors, as the model passes them).

    Returns [(name, relative error)] for the output and the gradients of q, k, v and the sink.
    """
    g = torch.Generator(device=DEV).manual_seed(seed)
    B, Tq = meta.q_pos.shape
    Tk = meta.k_pos.shape[1]
    base = [torch.randn(B, H, Tq, D, generator=g, device=DEV), torch.randn(B, Hkv, Tk, D, generator=g, device=DEV),
            torch.randn(B, Hkv, Tk, Dv, generator=g, device=DEV), torch.randn(H, generator=g, device=DEV) * 2]
    base = [t.to(dtype).double() for t in base]  # values both runs share exactly
    probe = torch.randn(B, H, Tq, Dv, generator=g, device=DEV, dtype=torch.float64)
    results = []
    for run, dt in ((fn, dtype), (None, torch.float64)):
        leaves = [t.to(dt).clone().requires_grad_() for t in base[:3]] + [base[3].float().clone().requires_grad_()]
        sink = leaves[3] if with_sink else None
        if run is None:
            out = attention(*leaves[:3], meta, D ** -0.5, window, None if sink is None else sink.double(),
                            backend="reference")
        else:
            qkv = [t.transpose(1, 2).contiguous().transpose(1, 2) if bthd else t for t in leaves[:3]]
            out = run(*qkv, meta, D ** -0.5, window, sink)
        (out.double() * probe).sum().backward()
        results.append([out] + [t.grad for t in leaves[:3]] + [leaves[3].grad if with_sink else None])
    names = ("out", "dq", "dk", "dv", "dsink")
    return [(n, rel(a, b)) for n, a, b in zip(names, *results, strict=True) if b is not None]


def check(errors, tol=2e-2):
    bad = [(n, e) for n, e in errors if not e < tol]
    assert not bad, f"errors over {tol}: {bad}"


@pytest.mark.parametrize("T", [128, 129, 300, 1024])
def test_flex_swa_with_sink(T):
    check(attn_grads(attention_flex, plain_meta(2, T), 8, 2, 129, True, seed=T))


@pytest.mark.parametrize("T", [1, 100, 129, 300, 1000])
@pytest.mark.parametrize("window", [129, 7])
def test_triton_swa_with_sink(T, window):
    check(attn_grads(attention_triton, plain_meta(2, T), 8, 2, window, True, seed=T))


@pytest.mark.parametrize("window, with_sink", [(129, True), (129, False), (None, False)])
def test_triton_packed_documents_and_padding(window, with_sink):
    meta = packed_meta([70, 300, 5, 129, 200], pad=9)
    check(attn_grads(attention_triton, meta, 8, 4, window, with_sink, seed=4))


@pytest.mark.parametrize("T", [2, 300, 1024])
def test_triton_full_causal(T):
    """Without a window (the full-attention layers' kernels when cuDNN does not take the batch). Not T = 1: with
    one key and no sink the softmax is constant, dq and dk are zero, and a relative error is rounding over zero
    (the kernels' one-token tiles are checked with a sink in test_triton_swa_with_sink)."""
    check(attn_grads(attention_triton, plain_meta(2, T), 8, 4, None, False, seed=T))


def test_triton_other_head_dims():
    """Q/K 64 (one part), V 32; GQA 4:1; and a batch whose rows hold different documents."""
    check(attn_grads(attention_triton, plain_meta(3, 257), 4, 1, 129, True, seed=5, D=64, Dv=32))
    rows = [packed_meta([100, 157]), packed_meta([3, 200, 54], pad=0)]
    meta = AttnMeta(*(torch.cat([getattr(m, f) for m in rows]) for f in ("q_pos", "k_pos", "q_seg", "k_seg")))
    check(attn_grads(attention_triton, meta, 4, 2, 129, True, seed=6, D=48, Dv=32))


@pytest.mark.parametrize("packed", [False, True])
def test_triton_swa_with_rope_and_value_scale_inside(packed):
    """banded_swa_qkv (from the projection's output, the gradient through RoPE and the value scale in the kernels)
    against RoPE, the scale and the reference attention in fp64 on the same bf16 values: output, the projection's
    gradient (q, k and v columns) and the sink's; Q/K 192 = 128 + 64 with 64 rotary dims, and Q/K 64 with 32."""
    from mimo_flash.ops.attention import attention_qkv
    for H, Hkv, D, Dv, R in ((16, 8, 192, 128, 64), (4, 1, 64, 32, 32)):
        meta = packed_meta([70, 300, 5, 129, 200], pad=9) if packed else plain_meta(2, 1000)
        B, T = meta.q_pos.shape
        g = torch.Generator(device=DEV).manual_seed(D + packed)
        ang = meta.q_pos[..., None].double() * torch.rand(R // 2, generator=g, device=DEV, dtype=torch.float64)
        cos, sin = (f(torch.cat([ang, ang], -1)).to(torch.bfloat16) for f in (torch.cos, torch.sin))
        x0 = torch.randn(B, T, H * D + Hkv * (D + Dv), generator=g, device=DEV).to(torch.bfloat16)
        s0 = torch.randn(H, generator=g, device=DEV) * 2
        probe = torch.randn(B, H, T, Dv, generator=g, device=DEV, dtype=torch.float64)
        dims = (H, Hkv, D, Dv, 0.7)
        res = []
        for run in ("triton", "reference"):
            dt = torch.bfloat16 if run == "triton" else torch.float64
            x, s = x0.to(dt, copy=True).requires_grad_(), s0.clone().requires_grad_()
            if run == "triton":
                out = attention_qkv(x, cos, sin, dims, meta, D ** -0.5, 129, s)
                assert out is not None  # the fused kernels took it
            else:
                q, k, v = (t.transpose(1, 2) for t in rope._rope_qkv(x, cos.double(), sin.double(), *dims))
                out = attention(q, k, v, meta, D ** -0.5, 129, s.double(), backend="reference")
            (out.double() * probe).sum().backward()
            res.append([out, x.grad, s.grad])
        nq, nk = H * D, Hkv * D
        (o, gx, gs), (o_ref, gx_ref, gs_ref) = res
        check([("out", rel(o, o_ref)), ("dq", rel(gx[..., :nq], gx_ref[..., :nq])),
               ("dk", rel(gx[..., nq:nq + nk], gx_ref[..., nq:nq + nk])),
               ("dv", rel(gx[..., nq + nk:], gx_ref[..., nq + nk:])),
               ("dsink", rel(gs, gs_ref))])
        # full attention: taken for packed documents, left to cuDNN (None) for plain batches under "auto"; and
        # where it does not apply: rotary dims that are not the head dim's first part (or its first half)
        assert (attention_qkv(x0, cos, sin, dims, meta, D ** -0.5, None, None) is None) == (not packed)
        assert attention_qkv(x0, cos, sin, dims, meta, D ** -0.5, None, None, backend="triton") is not None
        assert attention_qkv(x0, cos[..., :16], sin[..., :16], dims, meta, D ** -0.5, 129, s0) is None


@pytest.mark.parametrize("window, with_sink", [(129, True), (None, False)])
def test_flex_packed_documents_and_padding(window, with_sink):
    meta = packed_meta([70, 300, 5, 129, 200], pad=9)
    check(attn_grads(attention_flex, meta, 8, 4, window, with_sink, seed=1))


def test_flex_queries_against_longer_keys():
    check(attn_grads(attention_flex, cache_meta(128, 700), 4, 1, 129, True, seed=2))
    check(attn_grads(attention_flex, cache_meta(200, 700), 4, 1, None, False, seed=3))


@pytest.mark.parametrize("T", [100, 1000])
def test_cudnn_full_causal(T):
    check(attn_grads(attention_cudnn, plain_meta(2, T), 8, 2, None, False, seed=T))


def test_auto_picks_the_fast_kernels_on_cuda():
    q = torch.randn(1, 8, 512, 192, device=DEV, dtype=torch.bfloat16)
    applies = {name: a for name, (a, _) in _FAST.items()}
    assert applies["cudnn"](q, plain_meta(1, 512), None, None)
    assert not applies["cudnn"](q, plain_meta(1, 512), 129, torch.zeros(8, device=DEV))
    assert applies["triton"](q, plain_meta(1, 512), 129, torch.zeros(8, device=DEV))
    assert applies["triton"](q, packed_meta([200, 312]), 129, torch.zeros(8, device=DEV))
    assert applies["triton"](q, packed_meta([200, 312]), None, None)  # full attention of packed documents
    assert applies["flex"](q[:, :, :128], cache_meta(128, 512), 129, None)
    assert not applies["flex"](q[:, :, :1], cache_meta(1, 512), 129, None)  # decode steps go elsewhere


def test_grouped_mm_experts_cuda():
    g = torch.Generator(device=DEV).manual_seed(0)
    N, D, I, E, k = 1000, 256, 128, 16, 4
    x = torch.randn(N, D, generator=g, device=DEV).bfloat16()
    gate_up = (torch.randn(E, 2 * I, D, generator=g, device=DEV) * D ** -0.5).bfloat16()
    down = (torch.randn(E, D, I, generator=g, device=DEV) * I ** -0.5).bfloat16()
    router = torch.randn(E, D, generator=g, device=DEV) * 0.3
    bias = torch.zeros(E, device=DEV)
    bias[3], bias[7] = -100.0, 0.7  # one empty expert, one overfull
    probe = torch.randn(N, D, generator=g, device=DEV, dtype=torch.float64)
    res = []
    for backend, dt in (("grouped", torch.bfloat16), ("reference", torch.float64)):
        leaves = [t.detach().to(dt).clone().requires_grad_() for t in (x, gate_up, down)]
        r = router.clone().requires_grad_()
        idx, w, _ = route(leaves[0], r, bias, k, 1, 1, True, 1.0)
        out = experts(leaves[0], idx, w, leaves[1], leaves[2], backend=backend)
        # the backward's buffers come from memory that held NaNs (as in training, where the allocator reuses
        # what earlier steps freed): an output left unwritten shows
        dirty = [torch.full((n,), float("nan"), device=DEV) for n in [1 << 18] * 64 + [1 << 20] * 16]
        del dirty
        (out.double() * probe).sum().backward()
        res.append([out] + [t.grad for t in leaves] + [r.grad])
    assert not res[0][2][3].any() and not res[0][3][3].any()  # expert 3 had no tokens: its gradients are zero
    check([(n, rel(a, b)) for n, a, b in zip(("out", "dx", "dgu", "ddown", "drouter"), *res, strict=True)])


@pytest.mark.parametrize("mode", ["grouped_mm", "triton", "fused", "routed"])
def test_batched_decode_experts_cuda(mode):
    """options().decode_experts past E/2 pairs (batched decode, verification), bf16 at the mini preset's sizes:
    eager and traced by torch.compile (fullgraph, as the decode graphs trace it) against fp64; one expert empty,
    one with more than a tile of pairs."""
    from mimo_flash.ops.moe import experts_decode
    g = torch.Generator(device=DEV).manual_seed(1)
    D, I, E, k = 1024, 512, 64, 8
    gate_up = (torch.randn(E, 2 * I, D, generator=g, device=DEV) * D ** -0.5).bfloat16()
    down = (torch.randn(E, D, I, generator=g, device=DEV) * I ** -0.5).bfloat16()
    for N in (16, 128):
        x = torch.randn(N, D, generator=g, device=DEV).bfloat16()
        idx = torch.stack([torch.randperm(E - 2, generator=g, device=DEV)[:k] + 1 for _ in range(N)])
        idx = torch.where(idx >= 5, idx + 1, idx)  # (distinct experts a token, as the router chooses them)
        idx[:, 0] = 5  # expert 5 in every token; expert 0 in none
        w = torch.rand(N, k, generator=g, device=DEV)
        want = experts(x.double(), idx, w.double(), gate_up.double(), down.double(), backend="reference")
        with override(decode_experts=mode):
            eager = experts_decode(x, idx, w, gate_up, down)
            traced = torch.compile(experts_decode, fullgraph=True, dynamic=False)(x, idx, w, gate_up, down)
        assert rel(eager, want) < 1e-2 and rel(traced, want) < 1e-2, (N, rel(eager, want), rel(traced, want))


@pytest.mark.parametrize("E", [64, 256])
def test_router_kernel_is_fp32_routing(E):
    """The Triton router (bf16 tokens, the fp32 weight in three bf16 parts) against fp64: the same top-8
    wherever the 8th and 9th choices are apart by more than the fp32 rounding, the weights and both
    gradients (with the same choice) to fp32 precision, x's gradient to bf16's."""
    from mimo_flash.ops.kernels.router import route as route_triton
    g = torch.Generator(device=DEV).manual_seed(0)
    N, D, k = 4096, 1024, 8
    x0 = torch.randn(N, D, generator=g, device=DEV).bfloat16()
    w0 = torch.randn(E, D, generator=g, device=DEV) * D ** -0.5
    bias = torch.randn(E, generator=g, device=DEV) * 0.01
    probe = torch.randn(N, k, generator=g, device=DEV, dtype=torch.float64)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    idx, wt, counts = route_triton(x, w, bias, k, True, 2.5, True)
    (wt.double() * probe).sum().backward()
    x64, w64 = x0.double().requires_grad_(), w0.double().requires_grad_()
    s64 = torch.sigmoid(x64 @ w64.t())
    top = (s64.detach() + bias.double()).topk(k + 1, dim=-1)
    clear = top.values[:, k - 1] - top.values[:, k] > 1e-5
    assert clear.float().mean() > 0.99
    assert torch.equal(idx.sort(-1).values[clear], top.indices[:, :k].sort(-1).values[clear])
    assert torch.equal(counts, torch.bincount(idx.reshape(-1), minlength=E))
    sel = s64.gather(1, idx)
    want = sel / (sel.sum(-1, keepdim=True) + 1e-20) * 2.5
    (want * probe).sum().backward()
    check([("w", rel(wt, want)), ("dw", rel(w.grad, w64.grad))], tol=1e-5)
    check([("dx", rel(x.grad, x64.grad))], tol=1e-2)


@pytest.mark.parametrize("fn", [attention_triton, attention_cudnn])
def test_model_layout_heads_after_tokens(fn):
    """q, k, v as the model passes them: [B, H, T, d] views of [B, T, H, d] tensors."""
    window, sink = (129, True) if fn is attention_triton else (None, False)
    check(attn_grads(fn, plain_meta(2, 700), 8, 4, window, sink, seed=5, bthd=True))


def test_counting_sort_by_expert_is_the_stable_argsort():
    from mimo_flash.ops.moe import sort_by_expert
    g = torch.Generator(device=DEV).manual_seed(0)
    for N, k, E in ((16384, 8, 64), (8192, 8, 256), (37, 2, 8)):
        idx = torch.randint(0, E, (N, k), generator=g, device=DEV)
        idx[: N // 3] = idx[: N // 3] % 3  # uneven loads, some experts empty in blocks
        order, inv, counts, tok, offs = sort_by_expert(idx, E)
        assert torch.equal(order, torch.argsort(idx.reshape(-1), stable=True))
        assert torch.equal(inv[order], torch.arange(N * k, device=DEV))
        assert torch.equal(counts, torch.bincount(idx.reshape(-1), minlength=E))
        assert torch.equal(tok, order // k) and torch.equal(offs, counts.cumsum(0).int())


def test_gather_sum_kernel():
    g = torch.Generator(device=DEV).manual_seed(0)
    for N, k, D in ((1000, 8, 4096), (37, 3, 200)):
        y = torch.randn(N * k, D, generator=g, device=DEV).bfloat16()
        idx = torch.randperm(N * k, generator=g, device=DEV)
        want = y.double()[idx].view(N, k, D).sum(1)
        assert rel(gather_sum(y, idx, k), want) < 4e-3


def test_launcher_keeps_each_specialization_apart():
    """ops/kernels/launch.py's Launcher reuses a compiled kernel only for arguments Triton specializes the same
    way: a row length of 1 (a constant to Triton), 16-byte aligned or not (pointer and row length), and
    each dtype get their own kernel, and every launch (the first through Triton, later ones direct) is exact."""
    from mimo_flash.ops.kernels import launch
    from mimo_flash.ops.kernels.moe import _gather_sum_kernel as kern

    assert isinstance(kern, launch.Launcher) and kern.direct  # the device's Triton is the one it was written for
    g = torch.Generator(device=DEV).manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for D in (1, 16, 24, 257):
            for shift in (0, 1):  # shift 1: a view one element in (unaligned pointer)
                base = torch.randn(64 * D + shift, generator=g, device=DEV).to(dtype)
                y = base[shift:].view(64, D)
                idx = torch.randperm(64, generator=g, device=DEV)
                block = max(16, min(1024, 1 << (D - 1).bit_length()))
                for _ in range(3):
                    out = torch.full((64, D), float("nan"), device=DEV, dtype=dtype)
                    kern[(64, 1)](y, idx, out, D, K=1, BLOCK_D=block, num_warps=1)
                    assert torch.equal(out, y[idx]), (dtype, D, shift)
    assert len(kern.kernels) >= 12


def test_launcher_fallback_launches_the_same():
    """Direct launches turned off (options().direct_launch, or a Launcher made with direct=False: what every
    other Triton version gets) launch through kernel[grid] with the same results, and keep no kernels of their own."""
    from mimo_flash.ops.kernels import launch
    from mimo_flash.ops.kernels.moe import _gather_sum_kernel

    g = torch.Generator(device=DEV).manual_seed(1)
    y = torch.randn(300, 200, generator=g, device=DEV).bfloat16()
    idx = torch.randperm(300, generator=g, device=DEV)
    want = y.double()[idx].view(100, 3, 200).sum(1)
    plain = launch.Launcher(_gather_sum_kernel.fn, direct=False)
    with override(direct_launch=False):
        for kern in (_gather_sum_kernel, plain):
            n = len(kern.kernels)
            for _ in range(3):
                out = torch.empty(100, 200, device=DEV, dtype=torch.bfloat16)
                kern[(100, 1)](y, idx, out, 200, K=3, BLOCK_D=256, num_warps=1)
                assert rel(out, want) < 4e-3
            assert len(kern.kernels) == n
    out = torch.empty(100, 200, device=DEV, dtype=torch.bfloat16)
    plain[(100, 1)](y, idx, out, 200, K=3, BLOCK_D=256, num_warps=1)
    assert rel(out, want) < 4e-3 and plain.kernels == {}


def test_compile_off_runs_the_plain_bodies():
    """options().compile=False: on CUDA the small ops run their plain PyTorch bodies (bit for bit), and no op
    finds its Triton kernels."""
    from mimo_flash.ops.compiled import triton_for
    g = torch.Generator(device=DEV).manual_seed(2)
    x = torch.randn(4, 300, 192, generator=g, device=DEV).bfloat16()
    y = torch.randn(4, 300, 192, generator=g, device=DEV).bfloat16()
    w = torch.randn(192, generator=g, device=DEV).bfloat16()
    with override(compile=False):
        assert triton_for(x, "norm") is None
        assert torch.equal(norm.rms_norm(x, w, 1e-5), norm.rms_norm.plain(x, w, 1e-5))
        for a, b in zip(norm.add_rms_norm(x, y, w, 1e-5), norm.add_rms_norm.plain(x, y, w, 1e-5), strict=True):
            assert torch.equal(a, b)
    assert triton_for(x, "norm") is not None


def test_compiled_fused_ops_match_their_bodies():
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(2, 300, 8, 192, generator=g, device=DEV).bfloat16().requires_grad_()  # [B, T, H, D]
    ang = torch.randn(2, 300, 32, generator=g, device=DEV)
    cos, sin = torch.cat([ang, ang], -1).cos().bfloat16(), torch.cat([ang, ang], -1).sin().bfloat16()
    h = torch.randn(500, 256, generator=g, device=DEV).bfloat16().requires_grad_()
    w = torch.rand(500, generator=g, device=DEV).requires_grad_()
    nw = torch.randn(192, generator=g, device=DEV).bfloat16().requires_grad_()
    gate, up = (h.detach()[:, :128].clone().requires_grad_(), h.detach()[:, 128:].clone().requires_grad_())
    qkv = torch.randn(2, 300, 3 * 192 + 128, generator=g, device=DEV).bfloat16().requires_grad_()
    x2 = torch.randn(2, 300, 8, 192, generator=g, device=DEV).bfloat16().requires_grad_()
    cases = {
        "rms_norm": (norm.rms_norm, (x, nw, 1e-5)),
        "add_rms_norm": (norm.add_rms_norm, (x, x2, nw, 1e-5)),
        "rope": (rope.rope, (x, cos, sin)),
        "swiglu_weighted": (swiglu.swiglu_weighted, (h, w)),
        "silu_mul": (swiglu.silu_mul, (gate, up)),
        # heads 2, kv heads 1, qk 192, v 128 from one [B, T, 2*192 + 192 + 128] projection
        "rope_qkv": (rope.rope_qkv, (qkv, cos, sin, 2, 1, 192, 128, 0.707)),
    }
    for name, (fn, args) in cases.items():
        outs = []
        for f in (fn, fn.plain):
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    a.grad = None
            y = f(*args)
            if isinstance(y, tuple):
                y = torch.cat([t.reshape(-1) for t in y])
            y.float().square().sum().backward()
            outs.append([y] + [a.grad.clone() for a in args if isinstance(a, torch.Tensor) and a.requires_grad])
        check([(f"{name}[{i}]", rel(a, b)) for i, (a, b) in enumerate(zip(*outs, strict=True))], tol=1e-2)


def test_mini_model_step_auto_vs_reference():
    """A small model end to end on CUDA, packed documents, MTP on: loss and every gradient of the fast
    paths in bf16 are as close to an fp32 reference run as the reference paths in bf16 are."""
    import copy
    cfg = MiMoConfig.preset("mini", num_hidden_layers=3, hybrid_layer_pattern=[0, 1, 1], vocab_size=1000,
                            n_routed_experts=16, num_nextn_predict_layers=1)
    torch.manual_seed(0)
    model = MiMoForCausalLM(cfg).to(DEV)
    for m in model.modules():
        if getattr(m, "attention_sink_bias", None) is not None:
            torch.nn.init.normal_(m.attention_sink_bias, std=1.0)
    ids = torch.randint(0, cfg.vocab_size, (2, 600), device=DEV)
    ar = torch.arange(600, device=DEV)
    seg = (ar >= 250).long().expand(2, 600)
    pos = torch.where(ar >= 250, ar - 250, ar).expand(2, 600)
    runs = {}
    for name, dtype, backend in (("fp32", torch.float32, "reference"), ("auto", torch.bfloat16, "auto"),
                                 ("ref", torch.bfloat16, "reference")):
        m = copy.deepcopy(model).to(dtype).set_backends(attention=backend, experts=backend)
        out = m(ids, labels=ids, mtp=True, position_ids=pos, segment_ids=seg)
        out.loss.backward()
        runs[name] = (out.loss.item(), {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None})
    (l32, g32), (la, ga), (lb, gb) = runs["fp32"], runs["auto"], runs["ref"]
    assert abs(la - l32) <= 2 * abs(lb - l32) + 1e-3 * abs(l32)
    errs = {n: (rel(ga[n], g32[n]), rel(gb[n], g32[n])) for n in g32}
    worse = {n: e for n, e in errs.items() if e[0] > 1.5 * e[1] + 1e-2}
    assert not worse, worse


def test_triton_cross_entropy_vs_fp64():
    """ops.loss on CUDA (the Triton kernels, in place or not) against F.cross_entropy in fp64."""
    import torch.nn.functional as F

    from mimo_flash.ops import loss as loss_mod
    g = torch.Generator(device=DEV).manual_seed(0)
    for N, V in ((1000, 32000), (37, 1000), (16, 152576)):
        x = (torch.randn(N, V, generator=g, device=DEV) * 3).bfloat16()
        assert loss_mod._triton_ok(x)
        t = torch.randint(0, V, (N,), generator=g, device=DEV)
        t[::7] = -100
        ref_leaf = x.double().requires_grad_()
        ref = F.cross_entropy(ref_leaf, t, ignore_index=-100, reduction="sum")
        (ref * 0.5).backward()
        for inplace in (False, True):
            leaf = x.clone().requires_grad_()
            got = loss_mod.cross_entropy_sum(leaf * 1, t, inplace)
            (got * 0.5).backward()
            assert got.dtype == torch.float32 and rel(got, ref) < 1e-5, (N, V, inplace)
            assert rel(leaf.grad, ref_leaf.grad) < 4e-3, (N, V, inplace)
            assert (leaf.grad[::7] == 0).all()
