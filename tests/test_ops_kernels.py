"""Each Triton kernel file of ops/kernels/ against its op's reference, forward and backward, run by Triton's CPU
interpreter in fp32 (index and mask logic without a GPU): one test per kernel. The GPU runs of the same kernels in
bf16 against fp64: test_ops_gpu.py; the cross-entropy kernels: test_ops_loss.py; the training kernels:
test_training.py."""

from __future__ import annotations

import pytest
from conftest import run_in_triton_interpreter

PRELUDE = r'''
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch
g = torch.Generator().manual_seed(0)

def max_err(got, want):
    return max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))
'''


def interpret(body: str) -> None:
    run_in_triton_interpreter(PRELUDE + body + '\nprint("ok")\n')


def test_banded_swa_kernels():
    """ops/kernels/swa_attention.py banded_swa (forward, dQ, dK/dV, the sink's gradient) against the reference
    attention in fp64 (in fp32, the first torch.exp of a fresh process was off by 1e-4 relative in the OpenMP
    worker thread's half in about one run in five on the 2-core CI machine; none after any earlier parallel op): window 9 with plain batches shorter than, as long as and longer than the window (and than a tile),
    and a row of packed documents (some shorter than the window) after padding, q/k/v in both layouts; and the
    same without a window (full causal attention, the full-attention layers)."""
    interpret(r'''
from mimo_flash.ops.attention import AttnMeta, attention
from mimo_flash.ops.kernels.swa_attention import banded_swa
W = 9
pos = torch.cat([torch.zeros(3, dtype=torch.long), torch.arange(60), torch.arange(5), torch.arange(85)])[None]
seg = torch.cat([-torch.arange(2, 5), torch.zeros(60, dtype=torch.long), torch.ones(5, dtype=torch.long),
                 torch.full((85,), 2)])[None]
cases = [(AttnMeta(pos, pos, seg, seg), True)]
for T in (5, 9, 10, 70):
    ar = torch.arange(T)[None]
    cases.append((AttnMeta(ar, ar, None, None, plain=True), T % 2 == 0))
# packed: q/k/v as the model passes them ([B, H, T, d] views of [B, T, H, d] tensors); plain: contiguous
for (meta, sink), W in [(c, w) for w in (9, None) for c in cases]:
    T = meta.q_pos.shape[1]
    heads_second = meta.plain
    shapes = [(4, 48), (2, 48), (2, 32)]
    base = [torch.randn(1, h, T, d, generator=g) if heads_second else torch.randn(1, T, h, d, generator=g)
            for h, d in shapes] + [torch.randn(4, generator=g)]
    probe = torch.randn(1, 4, T, 32, generator=g)
    res = []
    for run in ("triton", "reference"):
        leaves = [(t if run == "triton" else t.double()).clone().requires_grad_() for t in base]
        qkv = leaves[:3] if heads_second else [t.transpose(1, 2) for t in leaves[:3]]
        s = leaves[3] if sink else None
        if run == "triton":
            p = None if meta.plain else meta.q_pos.int()
            sg = None if meta.q_seg is None else meta.q_seg.int()
            out = banded_swa(*qkv, p, sg, 0.2, W, s)
            assert out.transpose(1, 2).is_contiguous()  # written in the [B, T, H, d] layout
        else:
            out = attention(*qkv, meta, 0.2, W, s, backend="reference")
        (out * probe.to(out.dtype)).sum().backward()
        res.append([out] + [t.grad for t in leaves[:3 + sink]])
    err = max_err(*res)
    assert err < 2e-5, (T, W, err)
''')


def test_banded_swa_qkv_kernels():
    """banded_swa_qkv: from the projection's output, the gradient through RoPE and the value scale taken in the
    attention kernels, against ops.rope's plain rope_qkv then the reference attention, both in fp64. Q/K 64 (one
    part) with 32 rotary dims and Q/K 48 = 32 + 16 with the first part rotated; per-row angles of packed positions
    (two rows), or one row of angles for plain batches shorter and longer than the window; and without a window."""
    interpret(r'''
from mimo_flash.ops.attention import AttnMeta, attention
from mimo_flash.ops.rope import _rope_qkv
from mimo_flash.ops.kernels.swa_attention import banded_swa_qkv
H, Hkv, Dv = 4, 2, 32
pos = torch.cat([torch.zeros(3, dtype=torch.long), torch.arange(60), torch.arange(4), torch.arange(40)])[None]
seg = torch.cat([-torch.arange(2, 5), torch.zeros(60, dtype=torch.long), torch.ones(4, dtype=torch.long),
                 torch.full((40,), 2)])[None]
Tp = pos.shape[1]
packed = (AttnMeta(pos.expand(2, Tp), pos.expand(2, Tp), seg.expand(2, Tp), seg.expand(2, Tp)), True, 2)
plain = lambda T: (AttnMeta(torch.arange(T)[None], torch.arange(T)[None], None, None, plain=True), False, 1)
for (meta, sink, B), (D, R), W in ((packed, (64, 32), 9), (plain(6), (64, 32), 9), (packed, (48, 32), 9),
                                  (plain(75), (48, 32), 9), (packed, (48, 32), None), (plain(75), (64, 32), None)):
    T = meta.q_pos.shape[1]
    ang = meta.q_pos.expand(B, T)[..., None].float() * torch.rand(R // 2, generator=g)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    if meta.plain:
        cos, sin = cos[:1], sin[:1]
    x0, s0 = torch.randn(B, T, H * D + Hkv * (D + Dv), generator=g), torch.randn(H, generator=g)
    probe = torch.randn(B, H, T, Dv, generator=g)
    res = []
    for run in ("triton", "reference"):
        dt = torch.float32 if run == "triton" else torch.float64
        x, s = x0.to(dt).clone().requires_grad_(), s0.to(dt).clone().requires_grad_()
        if run == "triton":
            p = None if meta.plain else meta.q_pos.expand(B, T).int().contiguous()
            sg = None if meta.q_seg is None else meta.q_seg.expand(B, T).int().contiguous()
            out = banded_swa_qkv(x, cos, sin, H, Hkv, D, Dv, 0.7, p, sg, 0.2, W, s if sink else None)
            assert out.transpose(1, 2).is_contiguous()
        else:
            q, k, v = (t.transpose(1, 2) for t in _rope_qkv(x, cos.double(), sin.double(), H, Hkv, D, Dv, 0.7))
            out = attention(q, k, v, meta, 0.2, W, s if sink else None, backend="reference")
        (out * probe.to(dt)).sum().backward()
        res.append([out, x.grad] + ([s.grad] if sink else []))
    err = max_err(*res)
    assert err < 2e-5, (T, D, W, err)
''')


def test_rope_qkv_kernels():
    """ops/kernels/rope.py: rope_qkv's forward and its input gradient against ops.rope's formulas (the formulas'
    own backward is checked against autograd in test_ops.py): heads 3 / 1 with qk dim 10 (6 rotated) and v dim 6
    (all heads in one block), and qk dim 1000 (4 heads per block of 4096 elements: two blocks, the second
    partial); the gradient of q in [B, H, T, d] storage."""
    interpret(r'''
from mimo_flash.ops.rope import _rope_qkv, _rope_qkv_grad
from mimo_flash.ops.kernels.rope import rope_qkv, rope_qkv_grad
ang = torch.randn(2, 7, 3, generator=g)
cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
for H, Hkv, D, Dv in ((3, 1, 10, 6), (6, 2, 1000, 6)):
    qkv = torch.randn(2, 7, H * D + Hkv * (D + Dv), generator=g)
    got, want = rope_qkv(qkv, cos, sin, H, Hkv, D, Dv, 0.7), _rope_qkv(qkv, cos, sin, H, Hkv, D, Dv, 0.7)
    assert all(a.shape == b.shape for a, b in zip(got, want, strict=True))
    assert max_err(got, want) < 1e-6, max_err(got, want)
    gq = torch.randn(2, H, 7, D, generator=g).transpose(1, 2)
    gk, gv = torch.randn(2, 7, Hkv, D, generator=g), torch.randn(2, 7, Hkv, Dv, generator=g)
    got, want = rope_qkv_grad(gq, gk, gv, cos, sin, 0.7), _rope_qkv_grad(gq, gk, gv, cos, sin, 0.7)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
''')


def test_norm_kernels():
    """ops/kernels/norm.py: add + RMSNorm and RMSNorm alone against ops.norm's plain bodies, forward and backward
    (both outputs' gradients): 150 rows of 600 (4-row blocks, several per backward program, a partial last
    program; a partial column block)."""
    interpret(r'''
from mimo_flash.ops.norm import _add_rms_norm, _rms_norm
from mimo_flash.ops.kernels import norm as kn
x0, y0, w0 = torch.randn(150, 600, generator=g), torch.randn(150, 600, generator=g), torch.randn(600, generator=g)
probes = torch.randn(2, 150, 600, generator=g)
for with_y in (True, False):
    res = []
    for fn in ((kn.add_rms_norm, _add_rms_norm) if with_y else (kn.rms_norm, _rms_norm)):
        x, y, w = (t.clone().requires_grad_() for t in (x0, y0, w0))
        outs = fn(x, y, w, 1e-5) if with_y else (fn(x, w, 1e-5),)
        sum((o * p).sum() for o, p in zip(outs, probes)).backward()
        res.append(list(outs) + [x.grad, w.grad] + ([y.grad] if with_y else []))
    for a, b in zip(*res, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()
''')


def test_swiglu_weighted_kernels():
    """ops/kernels/swiglu.py: the weighted SwiGLU and its backward (with the weights' gradient) against the
    formula through autograd: 300 rows over 3 row blocks, I = 24 in a 32-wide block (both masks used), with w in
    row order and in its own order (row r takes w[perm[r]], the gradient lands at perm[r])."""
    interpret(r'''
from mimo_flash.ops.kernels.swiglu import swiglu_weighted
h0, w0, probe = torch.randn(300, 48, generator=g), torch.rand(300, generator=g), torch.randn(300, 24, generator=g)
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
    assert max_err(*res) < 1e-5, max_err(*res)
''')


def test_gather_sum_kernel():
    """ops/kernels/moe.py gather_sum (the MoE's dispatch copy and combine sum) against indexing and a sum: 5 or 15
    output rows (a partial last block of rows), k = 3 and k = 1."""
    interpret(r'''
from mimo_flash.ops.kernels.moe import gather_sum
y = torch.randn(15, 40, generator=g)
idx = torch.randperm(15, generator=g)
for k in (3, 1):
    assert torch.allclose(gather_sum(y, idx, k), y[idx].view(-1, k, 40).sum(1), atol=1e-5)
''')


def test_sort_by_expert_kernels():
    """ops/kernels/moe.py sort_by_expert (the three counting-sort kernels) against the stable argsort: 3 blocks of
    pairs (the last partial) over 7 experts, one nobody chose; and 71 blocks over 256 experts, where the scan
    program takes the blocks in two steps of 64 (the second partial)."""
    interpret(r'''
from mimo_flash.ops.kernels.moe import sort_by_expert
for n, k, E, used in ((100, 3, 7, 6), (3000, 3, 256, 250)):
    idx = torch.randint(0, used, (n, k), generator=g)
    order, inv, counts, tok, offs = sort_by_expert(idx, E)
    want = torch.argsort(idx.reshape(-1), stable=True)
    assert torch.equal(order, want), (order, want)
    assert torch.equal(inv[order], torch.arange(k * n))
    assert torch.equal(counts, torch.bincount(idx.reshape(-1), minlength=E))
    assert torch.equal(tok, want // k) and offs.dtype == torch.int32 and torch.equal(offs, counts.cumsum(0).int())
''')


def test_router_kernels():
    """ops/kernels/router.py route against ops.moe.route's fp32 logits and autograd through it: 150 tokens (cut for
    a grid of 2 programs: 3 row blocks of 64, the last partial), D = 96, 16 experts, top 3, normalised and scaled and
    not; bf16 tokens (the weight split into its three bf16 parts; off CUDA their products are fp32 ones) and fp32
    tokens (parts w, 0, 0)."""
    interpret(r'''
from mimo_flash.ops.moe import route as route_plain
from mimo_flash.ops.kernels import router as R
from mimo_flash.ops.kernels.router import route
R.ROUTER_PROGRAMS = 2
assert R._router_meta(150, 16, 3, True)[1]["BLOCK_N"] == 64
x16 = torch.randn(150, 96, generator=g).bfloat16()
w0, bias = torch.randn(16, 96, generator=g) * 0.2, torch.randn(16, generator=g) * 0.1
probe = torch.randn(150, 3, generator=g)
for x0, norm, scaling in ((x16, True, 2.5), (x16, False, 1.0), (x16.float(), True, 2.5)):
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
    assert gx1.dtype == gx2.dtype == x0.dtype  # x's: bf16(g) @ bf16(W) in x's dtype (bf16: a rounding apart)
    gx1, gx2 = gx1.float(), gx2.float()
    assert (gx1 - gx2).norm() <= 1e-2 * gx2.norm(), (gx1 - gx2).abs().max()
    assert torch.allclose(gw1, gw2, rtol=1e-5, atol=1e-6), (gw1 - gw2).abs().max()
''')


def test_router_choice_kernel():
    """ops/kernels/router.py choose_topk (route_decode's choice on CUDA) against route_decode's ranks on the same
    fp32 logits: the same experts in the same order (best first, ties to the lower expert: rows of equal
    scores included) and the same weights, for 1, 37 and 130 rows, 16 and 64 experts; one row a program (a decode
    step's shape), then 130 rows cut for a grid of 3 programs (blocks of 64, the last partial); with rows marked
    absent (present), whose weights are 0 and choices unchanged."""
    interpret(r'''
from mimo_flash.ops.moe import route_decode
from mimo_flash.ops.kernels import router as R
from mimo_flash.ops.kernels.router import choose_topk
assert [R._router_meta(n, 64, 8, True)[1]["BLOCK_N"] for n in (1, 130, 8192)] == [1, 1, 32]
for N, E, k, programs in ((1, 16, 4, 264), (37, 64, 8, 264), (130, 64, 8, 264), (130, 64, 8, 3)):
    R.ROUTER_PROGRAMS = programs
    D = 24
    x, weight = torch.randn(N, D, generator=g), torch.randn(E, D, generator=g) * 0.3
    bias = torch.randn(E, generator=g) * 0.05
    weight[E // 2:E // 2 + 3] = weight[E // 2]  # three equal scores, first in every row: ties to the lower expert
    bias[E // 2:E // 2 + 3] = 2.0
    logits = x @ weight.t() if N > 64 else (x[:, None, :] * weight).sum(-1)  # (route_decode's, bit for bit)
    for norm, scaling in ((True, 2.5), (False, 1.0)):
        want_idx, want_w, _ = route_decode(x, weight, bias, k, norm, scaling)  # (CPU: the ranks)
        idx, w = choose_topk(logits, bias, k, norm, scaling)
        assert torch.equal(idx, want_idx), (N, E, idx, want_idx)
        assert torch.allclose(w, want_w, rtol=1e-6, atol=1e-6), (w - want_w).abs().max()
        # rows that are not there (present False): the same choice, weights 0, in both
        present = torch.arange(N) % 3 != 1
        idx_p, w_p = choose_topk(logits, bias, k, norm, scaling, present)
        ridx, rw, _ = route_decode(x, weight, bias, k, norm, scaling, present=present)
        assert torch.equal(idx_p, idx) and torch.equal(ridx, want_idx)
        assert torch.equal(w_p[present], w[present]) and not w_p[~present].any() and not rw[~present].any()
        assert torch.allclose(rw[present], want_w[present], rtol=1e-6, atol=1e-6)
    assert torch.equal(idx[:, :3], torch.arange(E // 2, E // 2 + 3).expand(N, 3))
''')


def test_launcher_takes_tritons_path_under_the_interpreter():
    """ops/kernels/launch.py: a Launcher over a kernel without Triton's compiled internals (the interpreter's)
    launches through kernel[grid], with direct launches allowed or turned off by options().direct_launch, and
    keeps no compiled kernels of its own."""
    interpret(r'''
from mimo_flash.options import override
from mimo_flash.ops.kernels import launch
from mimo_flash.ops.kernels.moe import _gather_sum_kernel as kern
assert isinstance(kern, launch.Launcher) and not kern.direct
y = torch.randn(12, 24, generator=g)
idx = torch.randperm(12, generator=g)
for direct in (True, False):
    with override(direct_launch=direct):
        out = torch.full((12, 24), float("nan"))
        kern[(12, 1)](y, idx, out, 24, K=1, BLOCK_D=32, num_warps=1)
        assert torch.equal(out, y[idx])
assert kern.kernels == {}
''')


def test_launcher_checks_the_triton_version():
    """Direct launches only for compiled @triton.jit kernels of the Triton release the launcher reads the
    internals of; any other version, or an object without them, takes Triton's own path."""
    triton = pytest.importorskip("triton")
    from mimo_flash.ops.kernels import launch
    from mimo_flash.ops.kernels.moe import _gather_sum_kernel

    fn = _gather_sum_kernel.fn
    assert isinstance(fn, triton.runtime.JITFunction)
    assert launch.direct_supported(fn, "3.6.0") and launch.direct_supported(fn, "3.6.1")
    for version in ("3.5.1", "3.7.0", "4.0.0", "3.60.0"):
        assert not launch.direct_supported(fn, version), version
    assert not launch.direct_supported(lambda: None, "3.6.0")
    assert launch.Launcher(fn).direct == launch.direct_supported(fn)
    assert not launch.Launcher(fn, direct=False).direct


def test_kernels_read_only_constexpr_globals():
    """The interpreter lets a @triton.jit function read any module global; the GPU compiler takes only
    tl.constexpr ones (a plain `BK = 128` read inside a kernel passed every interpreter test and failed its first
    GPU launch). Every kernel of the package reads module-level values only as constexpr parameters or globals."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "mimo_flash"
    checked, bad = 0, []
    for path in sorted(src.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        plain = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                 if isinstance(t, ast.Name) and "constexpr" not in ast.get_source_segment(text, node.value)}
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in fn.decorator_list):
                checked += 1
                local = {a.arg for a in fn.args.args} | {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)
                                                         and isinstance(n.ctx, ast.Store)}
                reads = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
                bad += [f"{path.name}:{fn.name} reads {name}" for name in sorted((reads & plain) - local)]
    assert checked >= 10, checked  # the walk found the package's kernels
    assert not bad, bad
