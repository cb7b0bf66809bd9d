"""The fast ops against the reference, on CPU: FlexAttention's block mask and sink, the grouped-GEMM
experts and their permutation, the fused elementwise ops. GPU runs of the same paths: test_ops_gpu.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import run_in_triton_interpreter

from mimo_flash.ops import fused
from mimo_flash.ops.attention import _FAST, AttnMeta, allowed_mask, attention
from mimo_flash.ops.attention_fast import BLOCK, attention_flex, block_tables
from mimo_flash.ops.moe import _Combine, _Dispatch, experts, grouped_mm_supported, route

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
    for name, t, r, g in zip(("out", "dx", "dgate_up", "ddown", "drouter"), truth, ref_bf16, got):
        assert rel(g, t) < 1e-2, name
        assert rel(g, t) < 2 * rel(r, t) + 1e-3, name


def test_grouped_fallback_matches_the_reference_in_fp64():
    args = moe_inputs(seed=1)
    for a, b in zip(moe_run("grouped", torch.float64, *args), moe_run("reference", torch.float64, *args)):
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


# ----------------------------------------------------------------------------------------- fused ops
def test_fused_bodies_are_the_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    w = torch.randn(16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), w * x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt())
    h = torch.randn(6, 8, generator=g, dtype=torch.float64)
    r = torch.rand(6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fused.swiglu_weighted(h, r), r[:, None] * F.silu(h[:, :4]) * h[:, 4:])
    torch.testing.assert_close(fused.silu_mul(h[:, :4], h[:, 4:]), F.silu(h[:, :4]) * h[:, 4:])
    # rope rotates pairs (j, j + R/2) of the first R dims by the position's angle and keeps the rest
    q = torch.randn(1, 3, 2, 10, generator=g, dtype=torch.float64)  # [B, T, H, D]
    ang = torch.randn(1, 3, 3, generator=g, dtype=torch.float64)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    out = fused.rope(q, cos, sin)
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
    for fn in (fused._RopeQKV.apply, fused._rope_qkv):
        qkv = qkv0.clone().requires_grad_()
        outs = fn(qkv, cos, sin, H, Hkv, D, Dv, 0.7)
        sum((o * p).sum() for o, p in zip(outs, probes)).backward()
        res.append(list(outs) + [qkv.grad])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b)
    q, _, v = res[1][:3]
    torch.testing.assert_close(q, fused.rope(qkv0[..., :H * D].view(B, T, H, D), cos, sin))
    torch.testing.assert_close(v, qkv0[..., H * D + Hkv * D:].view(B, T, Hkv, Dv) * 0.7)


def test_sink_scale_is_the_sink_softmax():
    meta = plain_meta(1, 20)
    q, k, v, sink = attn_inputs(meta, H=2, Hkv=2)
    without = attention(q, k, v, meta, 0.3, 5, None, backend="reference")
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~allowed_mask(meta, 5), float("-inf"))
    got = fused.sink_scale(without, scores.logsumexp(-1), sink)
    torch.testing.assert_close(got, attention(q, k, v, meta, 0.3, 5, sink, backend="reference"))


_INTERPRETED = r'''
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from mimo_flash.ops.attention import AttnMeta, attention
from mimo_flash.ops.triton_kernels import banded_swa, gather_sum
g = torch.Generator().manual_seed(0)
pos = torch.cat([torch.zeros(3, dtype=torch.long), torch.arange(60), torch.arange(90)])[None]
seg = torch.cat([-torch.arange(2, 5), torch.zeros(60, dtype=torch.long), torch.ones(90, dtype=torch.long)])[None]
# packed: q/k/v as the model passes them ([B, H, T, d] views of [B, T, H, d] tensors); plain: contiguous
for meta, sink in ((AttnMeta(pos, pos, seg, seg), True), (AttnMeta(pos, pos, None, None, plain=True), False)):
    T = pos.shape[1]
    if meta.plain:
        meta.q_pos = meta.k_pos = torch.arange(T)[None]
    heads_second = meta.plain
    shapes = [(4, 48), (2, 48), (2, 32)]
    base = [torch.randn(1, h, T, d, generator=g) if heads_second else torch.randn(1, T, h, d, generator=g)
            for h, d in shapes] + [torch.randn(4, generator=g)]
    probe = torch.randn(1, 4, T, 32, generator=g)
    res = []
    for run in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in base]
        qkv = leaves[:3] if heads_second else [t.transpose(1, 2) for t in leaves[:3]]
        s = leaves[3] if sink else None
        if run == "triton":
            p = None if meta.plain else meta.q_pos.int()
            sg = None if meta.q_seg is None else meta.q_seg.int()
            out = banded_swa(*qkv, p, sg, 0.2, 9, s)
            assert out.transpose(1, 2).is_contiguous()  # written in the [B, T, H, d] layout
        else:
            out = attention(*qkv, meta, 0.2, 9, s, backend="reference")
        (out * probe).sum().backward()
        res.append([out] + [t.grad for t in leaves[:3 + sink]])
    err = max((a - b).abs().max().item() for a, b in zip(*res))
    assert err < 1e-4, err
# from the projection's output, the gradient through RoPE and the value scale in the kernels (banded_swa_qkv):
# Q/K 64 (one part) with 32 rotary dims, and Q/K 48 = 32 + 16 with the first part rotated; per-row angles of the
# packed positions (two rows), or one row of angles for a plain batch
from mimo_flash.ops import fused
from mimo_flash.ops.triton_kernels import banded_swa_qkv
H, Hkv, Dv = 4, 2, 32
for (meta, sink, B), (D, R) in zip(
        ((AttnMeta(pos.expand(2, T), pos.expand(2, T), seg.expand(2, T), seg.expand(2, T)), True, 2),
         (AttnMeta(torch.arange(T)[None], torch.arange(T)[None], None, None, plain=True), False, 1)) * 2,
        ((64, 32), (64, 32), (48, 32), (48, 32))):
    ang = meta.q_pos.expand(B, T)[..., None].float() * torch.rand(R // 2, generator=g)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    if meta.plain:
        cos, sin = cos[:1], sin[:1]
    x0, s0 = torch.randn(B, T, H * D + Hkv * (D + Dv), generator=g), torch.randn(H, generator=g)
    probe = torch.randn(B, H, T, Dv, generator=g)
    res = []
    for run in ("triton", "reference"):
        x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
        if run == "triton":
            p = None if meta.plain else meta.q_pos.expand(B, T).int().contiguous()
            sg = None if meta.q_seg is None else meta.q_seg.expand(B, T).int().contiguous()
            out = banded_swa_qkv(x, cos, sin, H, Hkv, D, Dv, 0.7, p, sg, 0.2, 9, s if sink else None)
            assert out.transpose(1, 2).is_contiguous()
        else:
            q, k, v = (t.transpose(1, 2) for t in fused._rope_qkv(x, cos, sin, H, Hkv, D, Dv, 0.7))
            out = attention(q, k, v, meta, 0.2, 9, s if sink else None, backend="reference")
        (out * probe).sum().backward()
        res.append([out, x.grad] + ([s.grad] if sink else []))
    err = max((a - b).abs().max().item() for a, b in zip(*res))
    assert err < 1e-4, err
y = torch.randn(15, 40, generator=g)
idx = torch.randperm(15, generator=g)
for k in (3, 1):  # 5 or 15 output rows: a partial last block of rows
    assert torch.allclose(gather_sum(y, idx, k), y[idx].view(-1, k, 40).sum(1), atol=1e-5)
# weighted SwiGLU: 300 rows over 3 row blocks, I = 24 in a 32-wide block (both masks used)
from mimo_flash.ops.triton_kernels import swiglu_weighted
h0, w0, probe = torch.randn(300, 48, generator=g), torch.rand(300, generator=g), torch.randn(300, 24, generator=g)
# (and with w in its own order: row r takes w[perm[r]], the gradient lands at perm[r])
perm = torch.randperm(300, generator=g)
for order in (None, perm):
    res = []
    for run in ("triton", "formula"):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        wr = w if order is None else w[order]
        a = (swiglu_weighted(h, w, order) if run == "triton"
             else wr[:, None] * torch.nn.functional.silu(h[:, :24]) * h[:, 24:])
        (a * probe).sum().backward()
        res.append([a, h.grad, w.grad])
    err = max((a - b).abs().max().item() for a, b in zip(*res))
    assert err < 1e-5, err
# the gradient of rope_qkv: heads 3 / 1, qk dim 10 (6 rotated), v dim 6; gq in [B, H, T, d] storage
from mimo_flash.ops.triton_kernels import rope_qkv_grad
ang = torch.randn(2, 7, 3, generator=g)
cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
gq = torch.randn(2, 3, 7, 10, generator=g).transpose(1, 2)
gk, gv = torch.randn(2, 7, 1, 10, generator=g), torch.randn(2, 7, 1, 6, generator=g)
want = fused._rope_qkv_grad(gq, gk, gv, cos, sin, 0.7)
import mimo_flash.ops.triton_kernels as tk
for block in (4096, 32):  # all heads in one block; 2 heads per block (the loop over blocks, a partial last one)
    tk.ROPE_BLOCK = block
    got = rope_qkv_grad(gq, gk, gv, cos, sin, 0.7)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
# the forward of rope_qkv: the same shapes from one [B, T, 3 * 10 + 10 + 6] projection
qkv = torch.randn(2, 7, 46, generator=g)
for block in (4096, 32):
    tk.ROPE_BLOCK = block
    got, want = tk.rope_qkv(qkv, cos, sin, 3, 1, 10, 6, 0.7), fused._rope_qkv(qkv, cos, sin, 3, 1, 10, 6, 0.7)
    assert all(a.shape == b.shape and torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))
# add + RMSNorm, and RMSNorm alone: 150 rows of 600 (4-row blocks, several per backward program, a partial last
# program; a partial column block), both outputs' gradients
x0, y0, w0 = torch.randn(150, 600, generator=g), torch.randn(150, 600, generator=g), torch.randn(600, generator=g)
probes = torch.randn(2, 150, 600, generator=g)
for with_y in (True, False):
    res = []
    for fn in ((tk.add_rms_norm, fused._add_rms_norm) if with_y else (tk.rms_norm, fused._rms_norm)):
        x, y, w = (t.clone().requires_grad_() for t in (x0, y0, w0))
        outs = fn(x, y, w, 1e-5) if with_y else (fn(x, w, 1e-5),)
        sum((o * p).sum() for o, p in zip(outs, probes)).backward()
        res.append(list(outs) + [x.grad, w.grad] + ([y.grad] if with_y else []))
    for a, b in zip(*res):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()
# counting sort of (token, slot) pairs by expert: 3 blocks (the last partial), an expert nobody chose
from mimo_flash.ops.triton_kernels import sort_by_expert
# (and 24 blocks, the scan over them in two steps of 16, the second partial)
for n in (100, 1000):
    idx = torch.randint(0, 6, (n, 3), generator=g)
    tk.SCAN_ELEMS = 128
    order, inv, counts, tok, offs = sort_by_expert(idx, 7)
    want = torch.argsort(idx.reshape(-1), stable=True)
    assert torch.equal(order, want), (order, want)
    assert torch.equal(inv[order], torch.arange(3 * n)) and torch.equal(counts, torch.bincount(idx.reshape(-1), minlength=7))
    assert torch.equal(tok, want // 3) and offs.dtype == torch.int32 and torch.equal(offs, counts.cumsum(0).int())
# the router: 150 tokens (3 row blocks, the last partial), D = 96 (a partial 64-wide block), 16 experts, top 3,
# normalised and scaled and not; against ops.moe.route's fp32 logits and autograd through it. The interpreter
# gets bf16-valued fp32 tokens (its bf16 tl.dot is wrong); the bf16 split of the weight is checked on the GPU.
from mimo_flash.ops.moe import route as route_plain
from mimo_flash.ops.triton_kernels import route
x0 = torch.randn(150, 96, generator=g).bfloat16().float()
w0, bias = torch.randn(16, 96, generator=g) * 0.2, torch.randn(16, generator=g) * 0.1
probe = torch.randn(150, 3, generator=g)
for norm, scaling in ((True, 2.5), (False, 1.0)):
    res = []
    for run in ("triton", "plain"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        if run == "triton":
            idx, wt, counts = route(x, w, bias, 3, norm, scaling, True)
            assert torch.equal(counts, torch.bincount(idx.reshape(-1), minlength=16))
        else:
            idx, wt, _ = route_plain(x, w, bias, 3, 1, 1, norm, scaling)
        order = idx.argsort(-1)  # the slot order is free (topk with sorted=False)
        idx, wt = idx.gather(1, order), wt.gather(1, order)
        (wt * probe).sum().backward()
        res.append((idx, wt, x.grad, w.grad))
    (i1, w1, gx1, gw1), (i2, w2, gx2, gw2) = res
    assert torch.equal(i1, i2)
    assert torch.allclose(w1, w2, rtol=1e-5, atol=1e-6), (w1 - w2).abs().max()
    assert torch.allclose(gx1, gx2, rtol=1e-2, atol=1e-3), (gx1 - gx2).abs().max()  # x's: bf16(g) @ bf16(W)
    assert torch.allclose(gw1, gw2, rtol=1e-5, atol=1e-6), (gw1 - gw2).abs().max()
print("ok")
'''


def test_triton_kernels_in_the_interpreter():
    """The banded SWA kernels (forward, dQ, dK/dV, sink gradient; inputs in both layouts; from the projection's
    output, with the gradient through RoPE and the value scale inside), the gather-sum,
    the weighted SwiGLU, RoPE of q/k/v both ways, add + RMSNorm, the counting sort by expert and the router, run by Triton's CPU interpreter in fp32 against the reference: index and mask
    logic without a GPU."""
    run_in_triton_interpreter(_INTERPRETED)
