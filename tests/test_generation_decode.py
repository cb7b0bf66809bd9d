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
@pytest.mark.parametrize("N, product", [(1, False), (3, False), (33, False), (130, True)])
def test_router_decode_backend_equals_route(N, product, monkeypatch):
    if product:  # the logits as one product (past ROUTER_FUSED_MACS), not the reduction fused into the norm
        monkeypatch.setattr(moe_ops, "ROUTER_FUSED_MACS", N * 16 * 24 - 1)
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
    with override(experts="decode", decode_experts="fused"):  # (its kernels are for CUDA: here the dense body)
        assert torch.equal(moe_ops.experts(x, idx, w, gate_up, down, "auto"), got)
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
from unittest.mock import patch
from mimo_flash.ops.kernels import decode_experts
from mimo_flash.ops.kernels.decode_experts import dense_experts
from mimo_flash.options import override

torch.set_num_threads(1)
g = torch.Generator().manual_seed(7)
# decode_experts="triton": the pairs sorted by expert through ops/kernels/moe.py's grouped kernel; "fused": every
# expert on every token in its two dense kernels; "routed": each expert on its listed tokens. E = 6 and k = 2: 3
# tokens are past E/2 pairs; 40 tokens give one expert more than 16 rows (two tiles, and two row blocks of the routed
# kernels); 150 take two row blocks of the dense kernels and several of the routed ones; experts 4 and 5 get none
# (the dense kernels skip them; the routed ones list none); K = 160 and I = 72 leave partial K steps and column tiles
E, D, I, k = 6, 160, 72, 2
gate_up, down = torch.randn(E, 2 * I, D, generator=g) * 0.1, torch.randn(E, D, I, generator=g) * 0.1
for N in (3, 40, 150):
    x = torch.randn(N, D, generator=g)
    idx = torch.stack([torch.randperm(4, generator=g)[:k] for _ in range(N)])
    idx[: N // 2, 0] = 0
    idx[: N // 2, 1] = 1 + torch.randint(0, 3, (N // 2,), generator=g)
    w = torch.rand(N, k, generator=g)
    want = moe_ops.experts_reference(x, idx, w, gate_up, down)
    wd = torch.zeros(N, E).scatter(1, idx, w)
    # other tiles: the last split's second expert slot past E; row tiles of 16 (several a weight tile), K steps of 32
    for tiles in ({"down": {"SPLITS": 4}}, {"gate_up": {"BM": 16, "BI": 32, "BK": 32},
                                            "down": {"BM": 16, "BD": 32, "BK": 32, "SPLITS": 3}}):
        got = dense_experts(x, wd, gate_up, down, tiles)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5, (N, tiles)
    # routed_experts at other tiles: row blocks of 16 (the expert listed in half the tokens takes several), a list
    # kernel of several steps (LIST_BLOCK 64 against 2N pairs), K steps and column tiles of 32
    tiles = {"gate_up": {"BM": 16, "BI": 32, "BK": 32}, "down": {"BM": 16, "BD": 32, "BK": 32}}
    with patch.object(decode_experts, "LIST_BLOCK", 64):
        got = decode_experts.routed_experts(x, idx, w, gate_up, down, tiles)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5, N
    for mode in ("triton", "fused", "routed"):
        with override(experts="decode", decode_experts=mode):
            got = moe_ops.experts(x, idx, w, gate_up, down, "auto")
        err = float((got - want).abs().max() / want.abs().max())
        assert err < 1e-5, (mode, N, err)
        # half precision, each product rounded once as torch._grouped_mm rounds, or the SwiGLU output once after
        # its routing weight (fp16: the interpreter's dots in bf16 are wrong in Triton 3.6; the GPU test runs bf16)
        xh, gh, dh = x.half(), gate_up.half(), down.half()
        with override(decode_experts=mode):
            got = moe_ops.experts_decode(xh, idx, w, gh, dh)
        ref = moe_ops.experts_reference(xh.float(), idx, w, gh.float(), dh.float())
        assert got.dtype == torch.float16 and float((got.float() - ref).norm() / ref.norm()) < 1e-2, (mode, N)
# tokens that are not there (routing weights 0: router's present): routed_experts lists none of their pairs, so
# the experts that only they chose (4 and 5 here) are not read and their rows are exactly 0 (never-written rows of
# its scratch would show as garbage); the other tokens as before
N = 40
x = torch.randn(N, D, generator=g)
idx = torch.stack([torch.randperm(4, generator=g)[:k] for _ in range(N)])
idx[::4] = torch.tensor([4, 5])
w = torch.rand(N, k, generator=g)
w[::4] = 0
w[1::4, 1] = 0  # one slot of a present token with a zero weight: it adds 0 as before
got = decode_experts.routed_experts(x, idx, w, gate_up, down)
want = moe_ops.experts_reference(x, idx, w, gate_up, down)
assert torch.equal(got[::4], torch.zeros_like(got[::4]))
pairs, cnt = torch.zeros(E, N, dtype=torch.int32), torch.zeros(E, dtype=torch.int32)
decode_experts._expert_lists_kernel[(E,)](idx.reshape(-1), w.reshape(-1), pairs, cnt, N * k, N, BP=32, CH=3)
listed = (w != 0) & (idx[..., None] == torch.arange(E)).permute(2, 0, 1)  # [E, N, k]
assert cnt.tolist()[4:] == [0, 0] and cnt.tolist() == listed.sum((1, 2)).tolist()
assert all(pairs[e, :cnt[e]].tolist() == listed[e].reshape(-1).nonzero()[:, 0].tolist() for e in range(E))
assert float((got - want).abs().max() / want.abs().max()) < 1e-5
with override(decode_experts="nope"):
    try:
        moe_ops.experts_decode(x, idx, w, gate_up, down)
        raise AssertionError("accepted decode_experts='nope'")
    except ValueError as e:
        assert "decode_experts" in str(e) and "nope" in str(e)
for f, args in ((dense_experts, (x, wd)), (decode_experts.routed_experts, (x, idx, w))):
    try:
        f(*args, gate_up.transpose(1, 2), down)
        raise AssertionError("accepted a strided gate_up")
    except ValueError as e:
        assert "contiguous" in str(e)
print("ok")
"""


def test_experts_decode_triton_and_fused_equal_reference():
    run_in_triton_interpreter(_TRITON_EXPERTS)


_TRITON_CACHE_ATTENTION = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch
from mimo_flash.generation.attention import cache_attention
from mimo_flash.generation.attention_triton import cache_attention_triton
from mimo_flash.ops.attention import AttnMeta

torch.set_num_threads(1)

def case(B, H, Hkv, Tq, S, D, Dv, window, sink, dtype, seed, tiles=None):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, Tq, D, generator=g).to(dtype), torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, Dv, generator=g).to(dtype)
    last = torch.randint(Tq, S if window is None else 3 * S, (B,), generator=g)  # each row's last position
    q_pos = last[:, None] - Tq + 1 + torch.arange(Tq)[None]
    q_seg = torch.zeros(B, Tq, dtype=torch.long)
    q_seg[0, 0] = -2  # a masked query column
    if B > 2:
        q_seg[B - 1] = -2  # a row with none valid (frozen: it reads no keys)
    if window is None:  # full layer: slot j holds position j; a few slots of row 1 empty
        k_pos = torch.arange(S).expand(B, S)
        k_seg = torch.zeros(B, S, dtype=torch.long)
        k_seg[1, 5:9] = -1
    else:  # a ring: the last S positions of each row in a shuffled slot order, one slot empty
        k_pos = torch.stack([torch.randperm(S, generator=g) + int(x) - S + 1 for x in last])
        k_seg = torch.where(k_pos >= 0, 0, -1)
        k_seg[:, 3] = -1
        # the kernel reads the tables as given: here int32, positions a column slice of a wider table
        wide = torch.full((B, S + 5), -7, dtype=torch.int32)
        wide[:, 2:S + 2] = k_pos
        k_pos, q_seg = wide[:, 2:S + 2], q_seg.int()
    meta = AttnMeta(q_pos=q_pos, k_pos=k_pos, q_seg=q_seg, k_seg=k_seg, aligned=False, plain=False)
    sk = torch.randn(H, generator=g) if sink else None
    want = cache_attention(q.double(), k.double(), v.double(), meta, 0.1, window, None if sk is None else sk.double())
    got = cache_attention_triton(q, k, v, q_pos, q_seg, k_pos, k_seg, 0.1, window, sk, tiles)
    assert got.dtype == dtype and got.shape == want.shape
    assert (got[0, :, 0] == 0).all()  # the masked column sees nothing
    if B > 2:
        assert (got[B - 1] == 0).all()
        got, want = got[:B - 1], want[:B - 1]  # (the torch body's row of no valid query and no sink: NaN)
    return float((got.double() - want).abs().max() / want.abs().max())

# decode (Tq 1) and verification (Tq 3, 4) rows, the last of three frozen; 1100 keys: nine splits of 128 keys (a small grid), three of 512
# (min_programs 0); full layers with and without a sink,
# rings with windows shorter and longer than the ring; head dims that are not powers of two (192 in the release),
# also as two products (48 = 32 + 16, 40 = 32 + 8 padded to 16), with other key blocks and splits
for B, H, Hkv, Tq, S, D, Dv, window, sink in [(3, 4, 2, 1, 300, 48, 32, None, True),
                                              (3, 4, 2, 3, 1100, 48, 32, None, False),
                                              (3, 8, 2, 4, 150, 40, 16, 7, True),
                                              (2, 8, 2, 1, 136, 40, 16, 129, False)]:
    for tiles in (None, {"split_d": False, "BLOCK_N": 64, "min_programs": 0},
                  {"split_d": True, "BLOCK_N": 64, "SPLIT_KEYS": 96}):
        err = case(B, H, Hkv, Tq, S, D, Dv, window, sink, torch.float32, S + Tq, tiles)
        assert err < 1e-6, (B, H, Tq, S, window, tiles, err)
err = case(3, 4, 2, 3, 700, 48, 32, None, True, torch.float16, 5)  # half precision: p rounded for the PV product
assert err < 2e-3, err
print("ok")
"""


def test_cache_attention_triton_equals_the_torch_body():
    run_in_triton_interpreter(_TRITON_CACHE_ATTENTION)


def test_split_plan_shortens_the_splits_of_small_grids():
    """Splits of SPLIT_KEYS keys where the grid has min_programs programs, halved down to MIN_SPLIT_KEYS where it
    has fewer; at most MAX_SPLITS splits; whole key blocks that cover the cache."""
    from mimo_flash.generation.attention_triton import ATTN_TILES, MAX_SPLITS, split_plan

    cfg = dict(ATTN_TILES, BLOCK_N=32, SPLIT_KEYS=512, min_programs=264)
    assert split_plan(64 * 4, 832, cfg) == (2, 13)  # batch 64, a full layer: 512 programs at 512 keys
    assert split_plan(64 * 8, 137, cfg) == (1, 5)  # batch 64, a SWA ring
    assert split_plan(16 * 4, 832, cfg) == (7, 4)  # batch 16: 256 then 128 keys (448 programs)
    assert split_plan(16 * 8, 137, cfg) == (2, 3)  # 128 keys is the floor (256 programs; 2 x 96 keys)
    assert split_plan(16 * 4, 832, dict(cfg, min_programs=0)) == (2, 13)
    assert split_plan(4, 1 << 16, cfg) == (MAX_SPLITS, 64)  # at most MAX_SPLITS splits, longer then
    for programs, S in [(1, 1), (3, 300), (16 * 4, 833), (4, 1 << 16)]:
        ns, blocks = split_plan(programs, S, cfg)
        assert (ns - 1) * blocks * 32 < S <= ns * blocks * 32


def test_cache_attention_auto_takes_the_kernel_for_verification_and_large_batches():
    """cache_attention="auto" (the default): the Triton kernel on CUDA for steps of several tokens a row and for
    one-token steps of TRITON_ROWS rows or more, the torch body for smaller one-token steps and off CUDA; "triton"
    for every step on CUDA; "torch" never."""
    from mimo_flash.generation.attention import TRITON_ROWS, uses_triton
    from mimo_flash.options import Options

    assert Options().cache_attention == "auto"
    assert [uses_triton("auto", True, t, 1) for t in (1, 2, 4)] == [False, True, True]
    assert [uses_triton("auto", True, 1, b) for b in (TRITON_ROWS - 1, TRITON_ROWS, 64)] == [False, True, True]
    assert [uses_triton("triton", True, t, 1) for t in (1, 2)] == [True, True]
    assert not any(uses_triton(m, c, t, b) for m, c, t, b in
                   (("torch", True, 2, 64), ("auto", False, 2, 64), ("triton", False, 2, 64)))


def test_cache_attention_kernel_declines_what_it_cannot_compute():
    """The kernel's fits(): bf16, fp16 and fp32 (all three the same), not fp64 (tl.dot has none: the fp64 reference
    of test_triton_cache_attention_on_gpu, a verification shape, went to the kernel under "auto" and failed to
    compile), nor more than MAX_ROWS query rows per kv head or a value dim it does not tile."""
    from mimo_flash.generation.attention_triton import MAX_ROWS, fits

    def shapes(dtype, H=16, Hkv=4, Tq=2, dv=128, kv_dtype=None):
        q = torch.zeros(1, H, Tq, 192, dtype=dtype)
        kv = kv_dtype or dtype
        return q, torch.zeros(1, Hkv, 8, 192, dtype=kv), torch.zeros(1, Hkv, 8, dv, dtype=kv)

    assert all(fits(*shapes(d)) for d in (torch.bfloat16, torch.float16, torch.float32))
    assert not fits(*shapes(torch.float64))
    assert not fits(*shapes(torch.bfloat16, kv_dtype=torch.float32))
    assert not fits(*shapes(torch.bfloat16, H=4 * MAX_ROWS, Tq=2)) and not fits(*shapes(torch.bfloat16, dv=96))
    # the position and segment tables are read as given: integers only (named before any launch)
    from mimo_flash.generation.attention_triton import cache_attention_triton
    q, k, v = shapes(torch.float32)
    pos, seg = torch.arange(8)[None], torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="k_pos must be an integer tensor, got torch.float32"):
        cache_attention_triton(q, k, v, pos[:, :2], seg[:, :2], pos.float(), seg, 0.1, None, None)


def test_triton_cache_attention_graphs_need_no_cache_bucket(monkeypatch):
    """options().cache_attention="triton": graphed steps of several rows are keyed and sliced by the whole cache
    (graph_bucket), one graph per batch size across the 256-key bucket boundary; on a CPU the torch body attends
    over every slot, so the tokens are plain greedy's, speculative chunks included. One row keeps its buckets."""
    from mimo_flash.generation import engine

    model = tiny_model(vocab_size=256)
    ids = torch.randint(0, 256, (3, 250), generator=torch.Generator().manual_seed(18))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    plain = generate(model, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    with override(cache_attention="triton"):
        for K in (0, 2):
            out = generate(model, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[],
                           num_speculative_tokens=K, cuda_graphs=True)
            assert torch.equal(out, plain), K
        runners = list(engine._RUNNERS[model].values())
        S = {r.cache.S for r in runners}
        keys = [key for r in runners for key in list(r.fns) + list(r.graphs)]
        buckets = {key[3] for key in keys if key[0] == "main"} | {key[2] for key in keys if key[0] == "greedy"}
        assert len(S) == 1 and buckets == S, (S, keys)  # (steps ran past position 256: buckets 256 and 512 before)
        one = generate(model, ids[:1, :230], max_new_tokens=40, eos_token_id=[], cuda_graphs=True)
        with override(cache_attention="torch"):
            assert torch.equal(one, generate(model, ids[:1, :230], max_new_tokens=40, eos_token_id=[]))
        r1 = [r for r in engine._RUNNERS[model].values() if r.cache.B == 1]
        assert {key[3] for r in r1 for key in r.fns if key[0] == "main"} == {256, r1[0].cache.S} != {256}
    engine._RUNNERS.pop(model, None)


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


def test_graphed_greedy_chunks_of_every_length_share_one_compiled_step():
    """Greedy graphs of 4, 8, 16 and 11 steps (runner.graph_steps) trace the one-token step once: each step's
    token ids [B, 1] have the same strides whatever the chunk's length (the compiled step is specialised on
    strides; a [B, n] token buffer's column j has stride n, which recompiled the whole model for every n)."""
    from torch._dynamo.utils import counters

    model = tiny_model(vocab_size=32, num_hidden_layers=2)
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(12))
    plain = generate(model, ids, max_new_tokens=40, eos_token_id=[])
    counters.clear()
    out, stats = generate(model, ids, max_new_tokens=40, eos_token_id=[], compile=True, return_stats=True)
    assert torch.equal(out, plain) and stats.runner == "GraphRunner" and stats.notes == []
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_compiled_speculative_advance_equals_eager():
    """The acceptance and state update of a speculative step, compiled as a GraphRunner compiles it (runner.glue),
    against the eager function: the same tokens, counts and next state, frozen rows unchanged, and the same cache
    rows rolled back."""
    model = tiny_model(vocab_size=6)
    cfg, B, K, S = model.config, 4, 2, 40
    g = torch.Generator().manual_seed(30)
    runner = GraphRunner(model, KVCache(cfg, B, S, dtype=model.dtype, num_mtp=K, slack=8), S, compile=True)
    fn = runner.glue(("advance", B, K, K, True), spec_mod._advance_greedy)
    assert fn is not spec_mod._advance_greedy
    D = cfg.hidden_size
    for frozen in (None, torch.tensor([False, True, False, False])):
        N = torch.tensor([20, 25, 9, 30])
        logits = torch.randn(B, K + 1, 6, generator=g)
        d = logits.argmax(-1)[:, :K].clone()
        d[2, 1] = (d[2, 1] + 1) % 6  # row 2 accepts one draft, row 3 none, the others both
        d[3, 0] = (d[3, 0] + 1) % 6
        args = (K, K, logits, d, N, N - 3, torch.tensor([1, 2, 3, 4]), torch.randint(0, 6, (B, K + 1), generator=g),
                torch.randn(B, K + 1, D, generator=g), torch.randn(B, K + 1, D, generator=g), frozen)
        results = []
        for f in (spec_mod._advance_greedy, fn):
            runner.cache.reset()
            groups = list(runner.cache._valid)
            for grp in groups:  # every slot written, position = slot index, so rollbacks show
                pos, valid = runner.cache._tables(grp)
                valid.fill_(True)
                if grp != "full":
                    pos.copy_(torch.arange(pos.shape[-1]).expand_as(pos))
            out = f(runner.cache, *args)
            results.append((out, {grp: runner.cache._tables(grp)[1].clone() for grp in groups}))
        (want, want_valid), (got, got_valid) = results
        for a, b in zip(want, got, strict=True):
            torch.testing.assert_close(b, a)
        assert all(torch.equal(got_valid[grp], want_valid[grp]) for grp in want_valid)
        count = got[1]
        assert count.tolist() == ([3, 3, 2, 1] if frozen is None else [3, 0, 2, 1])
        assert not all(v.all() for v in got_valid.values())  # (something was rolled back)


def test_compiled_sampling_draws_what_eager_draws():
    """A sampled step's token choice, draft and acceptance compiled as a GraphRunner compiles them (runner.glue),
    against the eager functions from the same generator state: the same tokens, accepted counts and draft
    probabilities, for temperature alone, top-k / top-p and a repetition penalty. The draws are made outside the
    compiled code, so the generator advances as much either way."""
    from mimo_flash.generation.acceptance import accept, draft_token
    from mimo_flash.generation.sampling import SamplingParams, sample_token

    model = tiny_model(vocab_size=40)
    cfg, B, k, V, S = model.config, 5, 2, 40, 40
    runner = GraphRunner(model, KVCache(cfg, B, S, dtype=model.dtype, num_mtp=k, slack=8), S, compile=True)
    g = torch.Generator().manual_seed(31)
    logits = torch.randn(B, k + 1, V, generator=g) * 2
    seen = torch.rand(B, V, generator=g) < 0.2
    for params, s in ((SamplingParams(True, 0.8), None), (SamplingParams(True, 1.2, top_k=9, top_p=0.9), None),
                      (SamplingParams(True, 0.9, repetition_penalty=1.3), seen)):
        outs = []
        for glue in (None, runner.glue):
            gen = torch.Generator().manual_seed(7)
            kw = {} if glue is None else {"glue": glue}
            tok = sample_token(logits[:, 0], params, s, gen, **kw)
            drafts = [draft_token(logits[:, j], params, s, gen, **kw) for j in range(k)]
            d = torch.stack([t for t, _ in drafts], 1)
            q = torch.stack([p for _, p in drafts], 1)
            seen_j = None if s is None else s[:, None].expand(B, k + 1, V)
            a, y = accept(logits + torch.randn(B, k + 1, V, generator=gen) * 3, d, q, params, gen, seen_j, **kw)
            outs.append((tok, d, q, a, y, gen.get_state()))
        (*want, want_state), (*got, got_state) = outs
        for w, o in zip(want, got, strict=True):
            torch.testing.assert_close(o, w)
        assert torch.equal(got_state, want_state)
        assert 0 < int(want[3].sum()) < B * k  # some drafts accepted, some not: both branches ran
    assert {key[1] for key in runner.fns if key[0] == "glue"} == {"sample", "draft", "accept"}


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

    def counted(runner, st, frozen, n=1, *sampling):
        calls.append(n)
        return real(runner, st, frozen, n, *sampling)

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


@pytest.mark.parametrize("K", [1, 2])
def test_whole_sampled_steps_draw_what_single_steps_draw(monkeypatch, K):
    """Sampled speculative steps run as captured chunks too (their random draws inside the graph, from the runner's
    generator that a seed reseeds, or the default one): the tokens equal the eager runner's, step by step, for a
    seed, top-k / top-p, EOS-frozen rows; each call draws afresh from its seed, and a repetition penalty keeps the
    step-by-step path."""
    model = tiny_model(vocab_size=12)
    ids = torch.randint(0, 12, (3, 10), generator=torch.Generator().manual_seed(21))
    mask = torch.ones_like(ids)
    mask[2, :5] = 0
    kw = dict(attention_mask=mask, max_new_tokens=24, num_speculative_tokens=K, do_sample=True, temperature=1.3,
              top_k=9, top_p=0.95, seed=5)
    eager = generate(model, ids, **kw)
    calls = []
    real = spec_mod._graphed_step

    def counted(runner, st, frozen, n=1, params=None, generator=None):
        calls.append((n, params.do_sample, generator is runner.rng))
        return real(runner, st, frozen, n, params, generator)

    monkeypatch.setattr(spec_mod, "_graphed_step", counted)
    out, stats = generate(model, ids, cuda_graphs=True, return_stats=True, **kw)
    assert torch.equal(out, eager) and stats.notes == []
    assert max(n for n, _, _ in calls) == spec_mod.SPEC_CHUNK and all(s and g for _, s, g in calls)
    assert sum(n for n, _, _ in calls) == stats.steps - 1  # every step after the first
    assert torch.equal(generate(model, ids, cuda_graphs=True, **kw), eager)  # the reused runner, reseeded
    other = generate(model, ids, cuda_graphs=True, **{**kw, "seed": 6})
    assert not torch.equal(other, eager) and torch.equal(other, generate(model, ids, **{**kw, "seed": 6}))
    eos = int(eager[0, 10 + 6])
    assert torch.equal(generate(model, ids, cuda_graphs=True, eos_token_id=eos, pad_token_id=0, **kw),
                       generate(model, ids, eos_token_id=eos, pad_token_id=0, **kw))
    n = len(calls)
    torch.manual_seed(3)  # (no seed: the default generator)
    unseeded = generate(model, ids, cuda_graphs=True, **{**kw, "seed": None})
    assert len(calls) > n and not any(g for _, _, g in calls[n:])
    torch.manual_seed(3)
    assert torch.equal(unseeded, generate(model, ids, **{**kw, "seed": None}))
    n = len(calls)
    generate(model, ids, cuda_graphs=True, repetition_penalty=1.2, **kw)
    assert len(calls) == n


def test_a_failed_sampled_capture_leaves_greedy_graphs(monkeypatch):
    """A sampled speculative step or plain chunk whose capture fails falls back to single eager-launched steps (the same
    tokens) and says so; greedy steps on the same runner keep their graphs."""
    from mimo_flash.generation import engine

    model = tiny_model(vocab_size=8)
    ids = torch.randint(0, 8, (2, 9), generator=torch.Generator().manual_seed(9))
    real_step, real_chunk = spec_mod._graphed_step, engine._greedy_chunk

    def step(runner, st, frozen, n=1, params=None, generator=None):
        if params.do_sample:
            raise RuntimeError("no RNG in graphs")
        return real_step(runner, st, frozen, n, params, generator)

    def chunk(runner, bucket, n, rings=None, limit=None, params=None, generator=None):
        if params is not None and params.do_sample:
            raise RuntimeError("no RNG in graphs")
        return real_chunk(runner, bucket, n, rings, limit, params, generator)

    for K in (0, 2):
        kw = dict(max_new_tokens=20, num_speculative_tokens=K)
        sampled = dict(do_sample=True, temperature=1.5, seed=4, **kw)
        want = generate(model, ids, **sampled)
        monkeypatch.setattr(spec_mod, "_graphed_step", step)
        monkeypatch.setattr(engine, "_greedy_chunk", chunk)
        with pytest.warns(UserWarning, match="no RNG in graphs"):
            out, stats = generate(model, ids, cuda_graphs=True, return_stats=True, **sampled)
        assert torch.equal(out, want)
        path = "spec-sampled" if K else "sampled"
        assert len(stats.notes) == 1 and f"graphed {path} step failed" in stats.notes[0]
        monkeypatch.undo()
        calls, real_run = [], GraphRunner.run_step

        def spy(self, key, *args, **kwargs):
            calls.append(key[0])
            return real_run(self, key, *args, **kwargs)

        monkeypatch.setattr(GraphRunner, "run_step", spy)  # the same runner (same shapes), its sampled path failed
        greedy = generate(model, ids, cuda_graphs=True, **kw)
        assert torch.equal(greedy, generate(model, ids, **kw))
        assert calls and set(calls) == {"spec" if K else "greedy"}
        monkeypatch.undo()


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


@pytest.mark.gpu
def test_triton_cache_attention_on_gpu():
    """The kernel on CUDA in bf16 at the released attention shapes (Q/K 192, V 128; full layers 64 query heads over 4
    kv heads, SWA 64 over 8 with a window of 128 and sinks), decode and verification rows, against the torch body in
    fp64, at ATTN_TILES (the head dim as 128 + 64) and at other tiles (one padded product); then compiled, graphed
    decoding of three rows through it gives the eager tokens (fp32, IEEE dots)."""
    from mimo_flash.generation.attention import cache_attention
    from mimo_flash.generation.attention_triton import cache_attention_triton
    from mimo_flash.ops.attention import AttnMeta

    g = torch.Generator(device="cuda").manual_seed(3)
    for Hkv, S, window, Tq in ((4, 3000, None, 1), (4, 3000, None, 4), (8, 140, 128, 1), (8, 140, 128, 3)):
        B, H = 3, 64
        q = torch.randn(B, H, Tq, 192, generator=g, device="cuda").bfloat16()
        k = torch.randn(B, Hkv, S, 192, generator=g, device="cuda").bfloat16()
        v = torch.randn(B, Hkv, S, 128, generator=g, device="cuda").bfloat16()
        last = torch.tensor([S - 1, S // 3, Tq + 5], device="cuda") if window is None else \
            torch.tensor([900, 500, 2000], device="cuda")
        q_pos = last[:, None] - Tq + 1 + torch.arange(Tq, device="cuda")[None]
        if window is None:
            k_pos = torch.arange(S, device="cuda").expand(B, S)
        else:
            k_pos = torch.stack([torch.randperm(S, generator=g, device="cuda") + int(x) - S + 1 for x in last])
        q_seg, k_seg = torch.zeros_like(q_pos), torch.zeros_like(k_pos)
        meta = AttnMeta(q_pos=q_pos, k_pos=k_pos, q_seg=q_seg, k_seg=k_seg, aligned=False, plain=False)
        sink = torch.randn(H, generator=g, device="cuda") if window else None
        want = cache_attention(q.double(), k.double(), v.double(), meta, 192 ** -0.5, window,
                               None if sink is None else sink.double())
        for tiles in (None, {"split_d": False, "BLOCK_N": 64, "SPLIT_KEYS": 128, "warps": 8, "stages": 3}):
            got = cache_attention_triton(q, k, v, q_pos, q_seg, k_pos, k_seg, 192 ** -0.5, window, sink, tiles)
            err = float((got.double() - want).norm() / want.norm())
            assert err < 1e-2, (Hkv, S, window, Tq, tiles, err)
    model = tiny_model(vocab_size=64).cuda()
    ids = torch.randint(0, 64, (3, 250), generator=torch.Generator().manual_seed(4)).cuda()
    eager = generate(model, ids, max_new_tokens=24, eos_token_id=[], cuda_graphs=False)
    with override(cache_attention="triton"):
        out, stats = generate(model, ids, max_new_tokens=24, eos_token_id=[], compile=True, return_stats=True)
    assert torch.equal(out, eager) and stats.notes == []
