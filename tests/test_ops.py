"""The fast ops against the reference, on CPU: FlexAttention's block mask and sink, the grouped-GEMM
experts and their permutation, the small ops' plain bodies, the compile switch. GPU runs of the same paths:
test_ops_gpu.py; the Triton kernels in Triton's CPU interpreter: test_ops_kernels.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mimo_flash.ops import rope as rope_ops
from mimo_flash.ops.attention import (_FAST, BLOCK, AttnMeta, allowed_mask, attention, attention_flex, block_tables,
                                      sink_scale)
from mimo_flash.ops.moe import _Combine, _Dispatch, experts, grouped_mm_supported, route
from mimo_flash.ops.norm import rms_norm
from mimo_flash.ops.rope import rope
from mimo_flash.ops.swiglu import silu_mul, swiglu_weighted

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def plain_meta(B, T):
    pos = torch.arange(T).expand(B, T)
    return AttnMeta(pos, pos, plain=True)


def packed_meta(lengths, pad=0):
    """One row: `pad` padding tokens (each its own segment), then documents of `lengths`."""
    pos = torch.cat([torch.zeros(pad, dtype=torch.long)] + [torch.arange(n) for n in lengths])[None]
    seg = torch.cat([-(torch.arange(pad) + 2)] + [torch.full((n,), d) for d, n in enumerate(lengths)])[None]
    return AttnMeta(pos, pos, seg, seg, aligned=True, plain=False)


def cache_meta(Tq, Tk):
    """The last Tq of Tk tokens against all Tk keys (a chunk of prefill with a cache)."""
    pos = torch.arange(Tk)[None]
    return AttnMeta(pos[:, Tk - Tq:], pos, aligned=False)


def shuffled_meta(T, seed):
    """Positions that are not the indices and segments that interleave: the worst case for tiles."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, T, (2, T), generator=g)
    seg = torch.randint(0, 3, (2, T), generator=g)
    return AttnMeta(pos, pos, seg, seg, aligned=True, plain=False)


METAS = {
    "plain-300": lambda: plain_meta(2, 300),
    "plain-128": lambda: plain_meta(1, 128),
    "plain-129": lambda: plain_meta(1, 129),
    "packed": lambda: packed_meta([50, 200, 3, 130, 1], pad=7),
    "cache": lambda: cache_meta(100, 420),
    "shuffled": lambda: shuffled_meta(333, 1),
}


def tiles_of(mask: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mask [B, Tq, Tk] bool -> (any allowed, all allowed) per tile [B, nq, nk]; overhang counts as allowed for 'all'."""
    B, Tq, Tk = mask.shape
    nq, nk = -(-Tq // block), -(-Tk // block)
    padded = F.pad(mask, (0, nk * block - Tk, 0, nq * block - Tq))
    over = F.pad(torch.zeros_like(mask), (0, nk * block - Tk, 0, nq * block - Tq), value=True)
    t = padded.view(B, nq, block, nk, block)
    o = over.view(B, nq, block, nk, block)
    return t.any(4).any(2), (t | o).all(4).all(2)


@pytest.mark.parametrize("name", list(METAS))
@pytest.mark.parametrize("window", [None, 9, 129])
@pytest.mark.parametrize("block", [16, BLOCK])
def test_block_tables_never_drop_an_allowed_pair(name, window, block):
    meta = METAS[name]()
    partial, full = block_tables(meta.q_pos, meta.k_pos, meta.q_seg, meta.k_seg, window, block)
    has_any, all_allowed = tiles_of(allowed_mask(meta, window)[:, 0], block)
    assert not (partial & full).any()
    assert not (has_any & ~(partial | full)).any(), "a tile with allowed pairs is skipped"
    assert not (full & ~all_allowed).any(), "a 'full' tile holds masked pairs"


def test_block_tables_are_tight_for_plain_and_packed_batches():
    """Plain SWA with the released window: each query tile needs its own and the previous key tile,
    and a plain causal batch's tiles below the diagonal are all 'full' (no mask function)."""
    T = 8 * BLOCK
    meta = plain_meta(1, T)
    partial, full = block_tables(meta.q_pos, meta.k_pos, None, None, 129)
    visited = partial | full
    assert visited.sum(-1).tolist() == [[1] + [2] * 7]
    partial, full = block_tables(meta.q_pos, meta.k_pos, None, None, None)
    assert partial.sum().item() == 8 and full.sum().item() == 8 * 7 // 2
    # two documents of 4 tiles each: causal tiles of the other document are skipped
    meta = packed_meta([4 * BLOCK, 4 * BLOCK])
    partial, full = block_tables(meta.q_pos, meta.k_pos, meta.q_seg, meta.k_seg, None)
    assert (partial | full).sum().item() == 2 * (4 * 5 // 2)


def attn_inputs(meta, H=4, Hkv=2, D=40, Dv=24, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    B, Tq = meta.q_pos.shape
    Tk = meta.k_pos.shape[1]
    q = torch.randn(B, H, Tq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Tk, Dv, generator=g, dtype=dtype)
    sink = torch.randn(H, generator=g, dtype=dtype) * 2
    return q, k, v, sink


@pytest.mark.parametrize("name", list(METAS))
@pytest.mark.parametrize("window, with_sink", [(129, True), (9, True), (None, False), (None, True)])
def test_flex_equals_reference(name, window, with_sink):
    """Block mask, mask function, GQA and the sink through lse: FlexAttention's eager (CPU) forward."""
    meta = METAS[name]()
    q, k, v, sink = attn_inputs(meta, seed=len(name))
    sink = sink if with_sink else None
    ref = attention(q, k, v, meta, 0.15, window, sink, backend="reference")
    got = attention_flex(q, k, v, meta, 0.15, window, sink)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_cpu_dispatch_is_unchanged():
    """On CPU no registered fast kernel applies, so 'auto' keeps its CPU choices."""
    assert {"cudnn", "flex"} <= set(_FAST)
    q = torch.randn(1, 4, 300, 8)
    for meta in (plain_meta(1, 300), packed_meta([100, 200])):
        for window, sink in ((None, None), (129, torch.zeros(4))):
            assert not any(applies(q, meta, window, sink) for applies, _ in _FAST.values())


# ----------------------------------------------------------------------------------------- experts
def moe_inputs(N=257, D=64, I=48, E=8, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    gate_up = torch.randn(E, 2 * I, D, generator=g, dtype=torch.float64) * D ** -0.5
    down = torch.randn(E, D, I, generator=g, dtype=torch.float64) * I ** -0.5
    router = torch.randn(E, D, generator=g, dtype=torch.float64) * 0.3
    bias = torch.zeros(E, dtype=torch.float64)
    bias[2] = -100.0  # expert 2 is never chosen: an empty group
    bias[5] = 0.5  # expert 5 takes most tokens: unequal groups
    # bf16-representable values: every dtype then routes the same tokens to the same experts
    x, gate_up, down = (t.bfloat16().double() for t in (x, gate_up, down))
    return x, gate_up, down, router, bias, k


def moe_run(backend, dtype, x, gate_up, down, router, bias, k):
    """Route (fp32 router, as the model does) and run the experts; returns output and gradients (fp64)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, gate_up, down)]
    r = router.detach().float().requires_grad_()
    idx, w, _ = route(leaves[0], r, bias.float(), k, 1, 1, True, 1.0)
    out = experts(*leaves[:1], idx, w, *leaves[1:], backend=backend)
    probe = torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64)
    (out.double() * probe).sum().backward()
    return [t.double() for t in (out, *(p.grad for p in leaves), r.grad)]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_router_logits_are_fp32_with_input_precision_gradient():
    from mimo_flash.ops.moe import _RouterLogits
    g = torch.Generator().manual_seed(0)
    w0, probe = torch.randn(8, 64, generator=g), torch.randn(50, 8, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        x0 = torch.randn(50, 64, generator=g).to(dtype)
        res = []
        for fn in (_RouterLogits.apply, lambda x, w: torch.nn.functional.linear(x.float(), w)):
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            logits = fn(x, w)
            (logits * probe).sum().backward()
            res.append((logits, x.grad, w.grad))
        (l1, gx1, gw1), (l2, gx2, gw2) = res
        assert l1.dtype == torch.float32 and torch.equal(l1, l2)  # the forward is the fp32 product itself
        assert gx1.dtype == dtype and gw1.dtype == torch.float32
        torch.testing.assert_close(gw1, gw2)
        err = ((gx1.double() - gx2.double()).norm() / gx2.double().norm()).item()
        assert err < (1e-2 if dtype == torch.bfloat16 else 1e-6), err  # bf16: the rounding of a bf16 product


def test_grouped_mm_experts_match_the_reference():
    """bf16 grouped GEMMs (CPU kernel of torch._grouped_mm) vs the fp64 reference loop, forward and
    backward (x, both weights, router), with an empty and an overfull expert; within bf16 rounding,
    and no worse than the reference loop run in bf16."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    args = moe_inputs()
    truth = moe_run("reference", torch.float64, *args)
    ref_bf16 = moe_run("reference", torch.bfloat16, *args)
    got = moe_run("grouped_mm", torch.bfloat16, *args)
    for name, t, r, g in zip(("out", "dx", "dgate_up", "ddown", "drouter"), truth, ref_bf16, got, strict=True):
        assert rel(g, t) < 1e-2, name
        assert rel(g, t) < 2 * rel(r, t) + 1e-3, name


def test_grouped_fallback_matches_the_reference_in_fp64():
    args = moe_inputs(seed=1)
    for a, b in zip(moe_run("grouped", torch.float64, *args), moe_run("reference", torch.float64, *args), strict=True):
        torch.testing.assert_close(a, b)


def test_dispatch_and_combine_are_adjoint_permutations():
    """gradcheck of the two custom autograd functions (each one's backward is the other's forward)."""
    N, k, D = 7, 3, 5
    idx = torch.randint(0, 4, (N, k), generator=torch.Generator().manual_seed(0))
    order = torch.argsort(idx.reshape(-1), stable=True)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(N * k)
    tok = order // k
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    ys = torch.randn(N * k, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _Dispatch.apply(t, tok, inv, k), (x,))
    assert torch.autograd.gradcheck(lambda t: _Combine.apply(t, tok, inv, k), (ys,))
    torch.testing.assert_close(_Dispatch.apply(x, tok, inv, k), x[tok])
    want = torch.zeros(N, D, dtype=torch.float64).index_add_(0, tok, ys)
    torch.testing.assert_close(_Combine.apply(ys, tok, inv, k), want)


def test_grouped_mm_constraints():
    bf = torch.bfloat16
    x = torch.randn(4, 64, dtype=bf)
    assert grouped_mm_supported(x, torch.randn(2, 64, 64, dtype=bf), torch.randn(2, 64, 32, dtype=bf)) == hasattr(torch, "_grouped_mm")
    assert not grouped_mm_supported(x, torch.randn(2, 72, 64, dtype=bf), torch.randn(2, 64, 36, dtype=bf))  # I=36: 72-byte rows
    assert not grouped_mm_supported(x.float(), torch.randn(2, 64, 64), torch.randn(2, 64, 32))
    misaligned = torch.randn(2 * 64 * 64 + 1, dtype=bf)[1:].view(2, 64, 64)
    assert not grouped_mm_supported(x, misaligned, torch.randn(2, 64, 32, dtype=bf))


# ----------------------------------------------------------------------------------------- small ops
def test_small_op_bodies_are_the_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    w = torch.randn(16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), w * x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt())
    h = torch.randn(6, 8, generator=g, dtype=torch.float64)
    r = torch.rand(6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(swiglu_weighted(h, r), r[:, None] * F.silu(h[:, :4]) * h[:, 4:])
    torch.testing.assert_close(silu_mul(h[:, :4], h[:, 4:]), F.silu(h[:, :4]) * h[:, 4:])
    # rope rotates pairs (j, j + R/2) of the first R dims by the position's angle and keeps the rest
    q = torch.randn(1, 3, 2, 10, generator=g, dtype=torch.float64)  # [B, T, H, D]
    ang = torch.randn(1, 3, 3, generator=g, dtype=torch.float64)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    out = rope(q, cos, sin)
    c, s = ang.cos()[:, :, None], ang.sin()[:, :, None]
    torch.testing.assert_close(out[..., :3], q[..., :3] * c - q[..., 3:6] * s)
    torch.testing.assert_close(out[..., 3:6], q[..., 3:6] * c + q[..., :3] * s)
    torch.testing.assert_close(out[..., 6:], q[..., 6:])


def test_rope_qkv_and_its_hand_written_gradient():
    """rope_qkv splits one projection into rotated q, k and scaled v; the CUDA path's backward (one
    concatenation, written by hand) equals autograd through the plain body."""
    g = torch.Generator().manual_seed(0)
    B, T, H, Hkv, D, Dv, R = 2, 5, 3, 1, 10, 4, 6
    qkv0 = torch.randn(B, T, H * D + Hkv * (D + Dv), generator=g, dtype=torch.float64)
    ang = torch.randn(B, T, R // 2, generator=g, dtype=torch.float64)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    probes = [torch.randn(B, T, h, d, generator=g, dtype=torch.float64) for h, d in ((H, D), (Hkv, D), (Hkv, Dv))]
    res = []
    for fn in (rope_ops._RopeQKV.apply, rope_ops._rope_qkv):
        qkv = qkv0.clone().requires_grad_()
        outs = fn(qkv, cos, sin, H, Hkv, D, Dv, 0.7)
        sum((o * p).sum() for o, p in zip(outs, probes, strict=True)).backward()
        res.append(list(outs) + [qkv.grad])
    for a, b in zip(*res, strict=True):
        torch.testing.assert_close(a, b)
    q, _, v = res[1][:3]
    torch.testing.assert_close(q, rope(qkv0[..., :H * D].view(B, T, H, D), cos, sin))
    torch.testing.assert_close(v, qkv0[..., H * D + Hkv * D:].view(B, T, Hkv, Dv) * 0.7)


def test_sink_scale_is_the_sink_softmax():
    meta = plain_meta(1, 20)
    q, k, v, sink = attn_inputs(meta, H=2, Hkv=2)
    without = attention(q, k, v, meta, 0.3, 5, None, backend="reference")
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~allowed_mask(meta, 5), float("-inf"))
    got = sink_scale(without, scores.logsumexp(-1), sink)
    torch.testing.assert_close(got, attention(q, k, v, meta, 0.3, 5, sink, backend="reference"))


# ----------------------------------------------------------------------------------------- compile limits
def test_recompile_limit_is_scoped():
    """A function compiled through ops.compiled keeps more than dynamo's default 8 variants (with fullgraph=True
    the 9th would be an error), and dynamo's own limit is what it was, after the calls and after an error."""
    import torch._dynamo

    from mimo_flash.ops.compiled import RECOMPILE_LIMIT, compile_scoped, recompile_limit

    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    before = getattr(torch._dynamo.config, name)
    assert before < 12 < RECOMPILE_LIMIT

    def double(x):
        return x * 2

    torch._dynamo.reset()
    f = compile_scoped(double, fullgraph=True, dynamic=False, backend="eager")
    for n in range(1, 13):
        torch.testing.assert_close(f(torch.ones(n)), torch.full((n,), 2.0))
        assert getattr(torch._dynamo.config, name) == before
    # the block form (what compile_scoped uses where torch.compile has no recompile_limit)
    plain = torch.compile(double, fullgraph=True, dynamic=False, backend="eager")
    torch._dynamo.reset()
    with pytest.raises(RuntimeError):
        with recompile_limit():
            assert getattr(torch._dynamo.config, name) == RECOMPILE_LIMIT
            for n in range(1, 13):
                plain(torch.ones(n))
            raise RuntimeError("leaving the block by an error")
    assert getattr(torch._dynamo.config, name) == before
    torch._dynamo.reset()
