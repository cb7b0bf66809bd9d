"""One device call's worth of checks and kernel timings for the fast paths (GPU).

1. the GPU correctness tests (tests/test_ops_gpu.py: every fast path vs the fp64 reference,
   forward and backward, fresh random inputs, lengths across the window, packed segments);
2. kernel timings at the full model's sizes: attention (cuDNN full, flex SWA + sink, flex full with
   documents), the grouped-GEMM experts, against the measured matmul peak;
3. whether FlexAttention recompiles when only the batch's positions change.

    python bench/gpu_check.py [--skip-tests]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

from common import attention_pairs, fmt, hardware_limits, header, table, time_ms

from mimo_flash.ops.attention import AttnMeta, attention_cudnn, attention_flex, attention_triton
from mimo_flash.ops.moe import experts, route

ROOT = Path(__file__).resolve().parents[1]


def run_tests() -> str:
    out = os.environ.get("OUT", ".")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_ops_gpu.py",
           "--tb=short", "-rf"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    Path(out, "gpu_tests.log").write_text(r.stdout + r.stderr)
    tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
    print("\n".join(tail), flush=True)
    return tail[-1] if tail else "no output"


def attn_case(name, fn, B, H, Hkv, T, window, sink, meta, peak):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, T, 192, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(B, Hkv, T, 192, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(B, Hkv, T, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    s = torch.randn(H, device="cuda", generator=g).requires_grad_() if sink else None
    dy = torch.randn(B, H, T, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    pairs = B * H * attention_pairs(T, window)
    fwd_flops = 2 * pairs * (192 + 128)
    f_ms = time_ms(lambda: fn(q, k, v, meta, 192 ** -0.5, window, s))

    def fb():
        for t in (q, k, v, s):
            if t is not None:
                t.grad = None
        fn(q, k, v, meta, 192 ** -0.5, window, s).backward(dy)

    fb_ms = time_ms(fb)
    return [name, f"{B}x{H}/{Hkv}x{T}", fmt(f_ms, ".2f"), fmt(fwd_flops / f_ms / 1e9, ".0f"), fmt(fb_ms, ".2f"),
            fmt(3.5 * fwd_flops / fb_ms / 1e9, ".0f")]


def experts_case(N, E, k, D, I, peak):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    gu = (torch.randn(E, 2 * I, D, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02).requires_grad_()
    dn = (torch.randn(E, D, I, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02).requires_grad_()
    router = (torch.randn(E, D, device="cuda", generator=g) * 0.02).requires_grad_()
    bias = torch.zeros(E, device="cuda")
    dy = torch.randn(N, D, device="cuda", dtype=torch.bfloat16, generator=g)
    flops = 2 * N * k * 3 * D * I
    rows = []

    def fwd():
        idx, w, _ = route(x, router, bias, k, 1, 1, True, 1.0)
        return experts(x, idx, w, gu, dn)

    def fb():
        for t in (x, gu, dn, router):
            t.grad = None
        fwd().backward(dy)

    f_ms, fb_ms = time_ms(fwd), time_ms(fb)
    rows.append([f"experts (route + grouped_mm), {N} tok, E={E}, top{k}", fmt(f_ms, ".2f"),
                 fmt(flops / f_ms / 1e9, ".0f"), fmt(fb_ms, ".2f"), fmt(3 * flops / fb_ms / 1e9, ".0f")])
    # the two grouped GEMMs alone, same groups
    idx, w, _ = route(x, router, bias, k, 1, 1, True, 1.0)
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    xs = x.detach()[torch.argsort(idx.reshape(-1), stable=True) // k]
    a = torch.randn(N * k, I, device="cuda", dtype=torch.bfloat16, generator=g)
    mm = lambda: (torch._grouped_mm(xs, gu.detach().transpose(-2, -1), offs=offs),
                  torch._grouped_mm(a, dn.detach().transpose(-2, -1), offs=offs))
    m_ms = time_ms(mm)
    rows.append([f"  two grouped_mm only (fwd), {N * k / E:.0f} rows/expert", fmt(m_ms, ".2f"),
                 fmt(flops / m_ms / 1e9, ".0f"), "", ""])
    return rows


def swa_sweep() -> None:
    """Tile settings of the banded SWA kernels at the mini training size (4 x 4096, 16/8 heads, window 129,
    sink, the model's [B, T, H, d] layout): one kernel's settings varied at a time, the others at their
    defaults; each setting's outputs and gradients checked against the defaults'."""
    import itertools

    from mimo_flash.ops.kernels import swa_attention as tk
    B, H, Hkv, T, W = 4, 16, 8, 4096, 129
    g = torch.Generator(device="cuda").manual_seed(0)
    # [B, H, T, d] views of [B, T, H, d] tensors, as the model passes them
    q = torch.randn(B, T, H, 192, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, Hkv, 192, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(B, T, Hkv, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2).requires_grad_()
    s = torch.randn(H, device="cuda", generator=g).requires_grad_()
    dy = torch.randn(B, T, H, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)

    def run():
        for t in (q, k, v, s):
            t.grad = None
        out = tk.banded_swa(q, k, v, None, None, 192 ** -0.5, W, s)
        out.backward(dy)
        return [out.detach(), q.grad, k.grad, v.grad, s.grad]

    defaults = {name: dict(getattr(tk, name)) for name in ("FWD_CFG", "DKDV_CFG", "DQ_CFG")}
    ref = run()
    base_f = time_ms(lambda: tk.banded_swa(q, k, v, None, None, 192 ** -0.5, W, s), iters=20)
    base_fb = time_ms(run, iters=20)
    rows = [["defaults", str(defaults), fmt(base_f, ".3f"), fmt(base_fb, ".3f"), "0"]]
    tiles = {"FWD_CFG": [(64, 64), (128, 64), (128, 32), (64, 128), (128, 128)],
             "DKDV_CFG": [(32, 64), (64, 64), (64, 32), (128, 64), (64, 128), (32, 128), (128, 32)]}
    tiles["DQ_CFG"] = tiles["DKDV_CFG"]
    stages = {"FWD_CFG": (2, 3), "DKDV_CFG": (1, 2), "DQ_CFG": (1, 2)}
    for name in ("FWD_CFG", "DKDV_CFG", "DQ_CFG"):
        results = []
        for (bm, bn), w, st in itertools.product(tiles[name], (4, 8), stages[name]):
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
            setattr(tk, name, cfg)
            try:
                got = run()
                err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))
                          for a, b in zip(got, ref))
                f = time_ms(lambda: tk.banded_swa(q, k, v, None, None, 192 ** -0.5, W, s), iters=20)
                fb = time_ms(run, iters=20)
                results.append([name, str(cfg), fmt(f, ".3f"), fmt(fb, ".3f"), f"{err:.1e}"])
            except Exception as e:  # noqa: BLE001  (out of shared memory / registers: not a candidate)
                results.append([name, str(cfg), "fail", type(e).__name__, ""])
            torch.cuda.synchronize()
        setattr(tk, name, defaults[name])
        results.sort(key=lambda r: float(r[3]) if r[2] != "fail" else 1e9)
        rows += results[:8]
    table("Banded SWA tile sweep, mini size 4x16/8x4096, window 129, sink (best 8 per kernel by fwd+bwd)",
          header(), ["kernel", "settings", "fwd ms", "fwd+bwd ms", "max rel err vs defaults"], rows)


def swa_rope_sweep() -> None:
    """The gradient through RoPE inside the banded SWA backward kernels (banded_swa_qkv) against RoPE's own
    backward kernel after banded_swa's, at the mini training size (4 x 4096, 16/8 heads, Q/K 192 with 64 rotary
    dims, V 128, window 129, sink): fwd and fwd+bwd ms, the backward kernels' tile settings varied one at a time."""
    import itertools

    from mimo_flash.ops.kernels import swa_attention as tk
    from mimo_flash.ops.rope import rope_qkv
    B, H, Hkv, T, W, D, Dv, R = 4, 16, 8, 4096, 129, 192, 128, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, T, H * D + Hkv * (D + Dv), device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    ang = torch.arange(T, device="cuda")[None, :, None] * torch.rand(R // 2, device="cuda", generator=g)
    cos, sin = (f(torch.cat([ang, ang], -1)).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    s = torch.randn(H, device="cuda", generator=g).requires_grad_()
    dy = torch.randn(B, T, H, Dv, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    dims = (H, Hkv, D, Dv, 0.7)

    def unfused():
        q, k, v = (t.transpose(1, 2) for t in rope_qkv(qkv, cos, sin, *dims))
        return tk.banded_swa(q, k, v, None, None, D ** -0.5, W, s)

    def inside():
        return tk.banded_swa_qkv(qkv, cos, sin, *dims, None, None, D ** -0.5, W, s)

    def fb(fn):
        def run():
            qkv.grad = s.grad = None
            out = fn()
            out.backward(dy)
            return [out.detach(), qkv.grad, s.grad]
        return run

    ref = fb(unfused)()

    def baseline():
        return ["RoPE kernel + banded_swa", "", fmt(time_ms(unfused, iters=50), ".3f"),
                fmt(time_ms(fb(unfused), iters=50), ".3f"), "0"]

    rows = [baseline()]
    defaults = {name: dict(getattr(tk, name)) for name in ("FWD_CFG", "DKDV_CFG", "DQ_CFG")}
    tiles = {"DKDV_CFG": [(32, 64), (64, 64), (64, 32), (32, 32)]}
    tiles["DQ_CFG"] = tiles["DKDV_CFG"]
    stages = {"DKDV_CFG": (1, 2), "DQ_CFG": (1, 2)}
    for name in ("", "DKDV_CFG", "DQ_CFG"):
        combos = [None] if not name else itertools.product(tiles[name], (4, 8), stages[name])
        for combo in combos:
            cfg = {} if combo is None else dict(BLOCK_M=combo[0][0], BLOCK_N=combo[0][1], num_warps=combo[1],
                                                 num_stages=combo[2])
            if name:
                setattr(tk, name, cfg)
            try:
                got = fb(inside)()
                err = max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(got, ref))
                rows.append(["RoPE inside " + (name or "defaults"), str(cfg), fmt(time_ms(inside, iters=50), ".3f"),
                             fmt(time_ms(fb(inside), iters=50), ".3f"), f"{err:.1e}"])
            except Exception as e:  # noqa: BLE001  (out of shared memory / registers: not a candidate)
                rows.append(["RoPE inside " + name, str(cfg), "fail", type(e).__name__[:30], ""])
            torch.cuda.synchronize()
        if name:
            setattr(tk, name, defaults[name])
    rows.append(baseline())  # again: the machine's drift over the sweep
    table("Banded SWA backward with RoPE's inside vs RoPE's own kernel, mini size 4x16/8x4096, window 129, sink",
          header(), ["path", "settings", "fwd ms", "fwd+bwd ms", "rel err vs unfused"], rows)


def grouped_mm_layouts() -> None:
    """The six grouped GEMMs of one mini-size MoE layer's training step (16384 tokens x top-8, E=64, D=1024,
    I=512, even groups), the weight gradients both ways round: as autograd computes them and as the
    transposed product."""
    P, E, D, I = 131072, 64, 1024, 512
    g = torch.Generator(device="cuda").manual_seed(0)
    def r(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)

    xs, gh, a, gy = r(P, D), r(P, 2 * I), r(P, I), r(P, D)
    gu, dn = r(E, 2 * I, D), r(E, D, I)
    offs = torch.arange(1, E + 1, device="cuda", dtype=torch.int32) * (P // E)
    cases = {
        "fwd gate_up: xs @ gate_up^T": (lambda: torch._grouped_mm(xs, gu.transpose(-2, -1), offs=offs), 2 * I * D),
        "fwd down: a @ down^T": (lambda: torch._grouped_mm(a, dn.transpose(-2, -1), offs=offs), I * D),
        "dx gate_up: gh @ gate_up": (lambda: torch._grouped_mm(gh, gu, offs=offs), 2 * I * D),
        "dx down: gy @ down": (lambda: torch._grouped_mm(gy, dn, offs=offs), I * D),
        "dW gate_up: gh^T @ xs -> [E, 2I, D]": (lambda: torch._grouped_mm(gh.t(), xs, offs=offs), 2 * I * D),
        "dW gate_up: xs^T @ gh -> [E, D, 2I]": (lambda: torch._grouped_mm(xs.t(), gh, offs=offs), 2 * I * D),
        "dW down: gy^T @ a -> [E, D, I]": (lambda: torch._grouped_mm(gy.t(), a, offs=offs), I * D),
        "dW down: a^T @ gy -> [E, I, D]": (lambda: torch._grouped_mm(a.t(), gy, offs=offs), I * D),
        "copy [E, D, 2I] -> contiguous transposed": (lambda: torch._grouped_mm(xs.t(), gh, offs=offs)
                                                     .transpose(-2, -1).contiguous(), 2 * I * D),
    }
    rows = []
    for name, (fn, per_row) in cases.items():
        ms = time_ms(fn, warmup=3, iters=20)
        rows.append([name, fmt(ms * 1e3, ".0f"), fmt(2 * P * per_row / ms / 1e9, ".0f")])
    table("Grouped GEMMs of a mini MoE layer (P=131072, E=64, D=1024, I=512)", header(),
          ["GEMM", "us", "TFLOP/s"], rows)


def recompiles() -> str:
    """Compile count of the flex path over three batches that differ only in positions/segments."""
    from torch._dynamo.utils import counters
    T, res = 1024, []
    q = torch.randn(1, 8, T, 192, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, T, 192, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 2, T, 128, device="cuda", dtype=torch.bfloat16)
    for cut in (300, 500, 700):
        before = counters["stats"]["unique_graphs"]
        ar = torch.arange(T, device="cuda")
        seg = (ar >= cut).long()[None]
        pos = torch.where(ar >= cut, ar - cut, ar)[None]
        attention_flex(q, k, v, AttnMeta(pos, pos, seg, seg), 0.1, 129, None)
        res.append(counters["stats"]["unique_graphs"] - before)
    return f"new graphs compiled per call for 3 packed batches of one shape: {res}"


def norm_sweep() -> None:
    """Rows per program and warps of the add + RMSNorm backward kernel at the mini training size (16384 x 1024,
    bf16): us per kernel (20 launches in a CUDA graph, so no host time), each setting's gradients checked
    against the default's."""
    import triton

    from mimo_flash.ops.kernels import norm as tk
    g = torch.Generator(device="cuda").manual_seed(0)
    N, D = 16384, 1024
    h, gh, go = (torch.randn(N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    w = torch.randn(D, device="cuda", dtype=torch.bfloat16, generator=g)
    rstd = torch.rand(N, device="cuda", generator=g) + 0.5
    gx = torch.empty_like(h)
    block_r, block_d = tk._norm_blocks(D)

    def launch(cfg):
        gwp = torch.empty(triton.cdiv(N, cfg["ROWS"]), D, device="cuda")
        tk._norm_bwd_kernel[(gwp.shape[0],)](h, w, rstd, go, gh, gx, gwp, N, D=D, HAS_GH=True,
                                             BLOCK_R=min(block_r, cfg["ROWS"]), BLOCK_D=block_d, **cfg)
        return gx.clone(), gwp.sum(0)

    default = dict(tk.NORM_BWD)
    ref = launch(default)
    rows = []
    for r, nw in ((64, 8), (64, 4), (32, 4), (32, 8), (16, 4), (16, 8), (8, 4), (128, 8)):
        cfg = dict(ROWS=r, num_warps=nw)
        got = launch(cfg)
        err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(got, ref))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(20):
                launch(cfg)
        rows.append([str(cfg), fmt(time_ms(graph.replay, iters=10) * 1e3 / 20, ".1f"), f"{err:.1e}"])
    table("add + RMSNorm backward kernel, 16384 x 1024 bf16", header(), ["setting", "us", "max rel diff"], rows,
          [f"default {default}; the kernel moves 128 MiB (h, g_out, g_h read; g_x written), plus the partial "
           "weight gradients and their sum, which the us include"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--swa-sweep", action="store_true", help="only the banded SWA tile sweep")
    ap.add_argument("--swa-rope-sweep", action="store_true", help="only RoPE's gradient inside the banded SWA "
                    "backward vs apart")
    ap.add_argument("--gmm-layouts", action="store_true", help="only the grouped-GEMM layout timings")
    ap.add_argument("--norm-sweep", action="store_true", help="only the add + RMSNorm backward settings")
    args = ap.parse_args()
    if args.swa_sweep:
        return swa_sweep()
    if args.swa_rope_sweep:
        return swa_rope_sweep()
    if args.gmm_layouts:
        return grouped_mm_layouts()
    if args.norm_sweep:
        return norm_sweep()
    summary = "skipped" if args.skip_tests else run_tests()
    peak, bw = hardware_limits()
    B, H, T = 1, 64, 8192
    pos = torch.arange(T, device="cuda").expand(B, T)
    plain = AttnMeta(pos, pos, plain=True)
    docs = torch.zeros(B, T, dtype=torch.long, device="cuda")
    one_doc = AttnMeta(pos, pos, docs, docs)  # same mask as plain, through segments: flex's general path
    rows = [
        attn_case("cuDNN causal (full layer)", attention_cudnn, B, H, 4, T, None, False, plain, peak),
        attn_case("flex causal, via segments", attention_flex, B, H, 4, T, None, False, one_doc, peak),
        attn_case("flex SWA 129 + sink", attention_flex, B, H, 8, T, 129, True, plain, peak),
        attn_case("triton SWA 129 + sink", attention_triton, B, H, 8, T, 129, True, plain, peak),
        attn_case("triton SWA 129 + sink, via segments", attention_triton, B, H, 8, T, 129, True, one_doc, peak),
        attn_case("triton SWA 129 + sink, mini 4x16/8x4096", attention_triton, 4, 16, 8, 4096, 129, True,
                  AttnMeta(*(torch.arange(4096, device="cuda").expand(4, 4096),) * 2, plain=True), peak),
    ]
    table("Attention kernels (bf16, Q/K 192, V 128)", header(),
          ["kernel", "B x H/Hkv x T", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s"], rows,
          [f"tests: {summary}", f"measured ceilings: matmul {peak:.0f} TFLOP/s, copy {bw:.2f} TB/s",
           "FLOPs count only allowed pairs (SWA: 129 keys per query); fwd+bwd = 3.5x fwd"])
    rows = experts_case(8192, 256, 8, 4096, 2048, peak) + experts_case(16384, 64, 8, 1024, 512, peak)
    table("Experts (bf16, grouped GEMMs)", header(), ["case", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms",
                                                      "fwd+bwd TFLOP/s"], rows,
          ["FLOPs: 2 * tokens * top_k * 3 * D * I forward, 3x for fwd+bwd; router not counted", recompiles()])


if __name__ == "__main__":
    main()
