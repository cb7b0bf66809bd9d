"""Block shapes of the batch-1 decode kernels (generation/kernels.py), timed one kernel at a time on the GPU.

    python bench/decode_kernels.py           # gemv_kernel and attn_kernel at the mini preset's shapes
    python bench/decode_kernels.py --multi   # gemv_multi_kernel (T tokens) at the released MTP layer's shapes

GEMV (gemv_kernel) at the mini preset's shapes (lm_head 32000 x 1024, q/k/v 5632 x 1024, o_proj 1024 x 2048)
against torch's F.linear; decode attention (attn_kernel) over a 128-slot ring and an 832-slot full cache.
Each variant: 20 back-to-back launches (no PDL) captured in a CUDA graph, the median of 5 replays, in us per
launch, with the bandwidth of the bytes it must read (the same weights every launch: partly from L2)."""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import time_us_graphed  # noqa: E402
from mimo_flash.generation import kernels as dk  # noqa: E402


def gemv(N: int, D: int):
    dev = "cuda"
    x = torch.randn(D, device=dev, dtype=torch.bfloat16)
    nw = torch.ones(D, device=dev, dtype=torch.bfloat16)
    w = torch.randn(N, D, device=dev, dtype=torch.bfloat16)
    out = torch.empty(N, device=dev, dtype=torch.bfloat16)
    dummy = torch.zeros(8, device=dev, dtype=torch.float32)
    cnt = torch.zeros(8, device=dev, dtype=torch.int32)
    nbytes = N * D * 2
    t = time_us_graphed(lambda: F.linear(x[None], w))
    print(f"GEMV {N} x {D}: F.linear {t:.2f} us = {nbytes / t / 1e6:.2f} TB/s")
    best = None
    for bn, bk, warps in itertools.product([2, 4, 8, 16], [512, 1024], [4, 8, 16]):
        if bk > D or bn * bk > 32768 or bn * bk < 256:
            continue
        n_prog = -(-N // bn)

        def run():
            dk.gemv_kernel[(n_prog,)](x, nw, w, out, out, out, dummy, cnt, cnt, cnt, N, 1e-6, D=D, HAS_NORM=True,
                                      HAS_RES=False, WRITE_XN=False, ARGMAX=False, NPROG=n_prog, BLOCK_N=bn,
                                      BLOCK_K=bk, BLOCK_P=2, PDL=False, num_warps=warps)
        try:
            t = time_us_graphed(run)
        except Exception as e:
            print(f"  BLOCK_N {bn} BLOCK_K {bk} warps {warps}: {type(e).__name__}")
            continue
        if best is None or t < best[0]:
            best = (t, bn, bk, warps)
        print(f"  BLOCK_N {bn:2d} BLOCK_K {bk:4d} warps {warps:2d}: {t:7.2f} us = {nbytes / t / 1e6:.2f} TB/s")
    t, bn, bk, warps = best
    print(f"  best: BLOCK_N {bn} BLOCK_K {bk} warps {warps}: {t:.2f} us = {nbytes / t / 1e6:.2f} TB/s", flush=True)


def gemv_multi(N: int, D: int, T: int, fp8: bool, gated: bool, deadline: float):
    """gemv_multi_kernel over [N, D] for T tokens (FP8 weights with 128x128 block scales, or bf16; gated: the
    dense MLP's down projection, x [T, 2D]): the block shapes triton_step's gemv_blocks picks, then a sweep."""
    from mimo_flash.generation.triton_step import gemv_blocks
    from mimo_flash.options import options

    dev = "cuda"
    tp = max(2, 1 << (T - 1).bit_length())
    x = torch.randn(T, 2 * D if gated else D, device=dev, dtype=torch.bfloat16)
    nw = torch.ones(D, device=dev, dtype=torch.bfloat16)
    w = torch.randn(N, D, device=dev, dtype=torch.bfloat16)
    s = torch.rand(-(-N // 128), -(-D // 128), device=dev) + 0.5
    if fp8:
        w = w.clamp(-448, 448).to(torch.float8_e4m3fn)
    out = torch.empty(T, N, device=dev, dtype=torch.bfloat16)
    nbytes = N * D * w.element_size()
    ref = time_us_graphed(lambda: F.linear(x[:, :D], w if not fp8 else w.to(torch.bfloat16)))
    t = options().triton_step
    dbn, dbk = gemv_blocks(N, D, t.tile // tp, t, fp8)
    dwarps = t.num_warps if N * D >= 1 << 24 else t.small_gemv_warps
    print(f"gemv_multi {N} x {D}, T {T}, {'fp8' if fp8 else 'bf16'}{', gated' if gated else ''}: {nbytes / 1e6:.0f} MB"
          f" (bf16 F.linear{' of the dequantized weight' if fp8 else ''}: {ref:.1f} us)", flush=True)

    def run_with(bn, bk, warps):
        def run():
            dk.gemv_multi_kernel[(-(-N // bn),)](x, nw, w, s if fp8 else w, out, out, out, N, 1e-6,
                                                 s.stride(0) if fp8 else 0, x.stride(0), out.stride(0), T=T,
                                                 T_PAD=tp, D=D, HAS_NORM=not gated, HAS_RES=False, WRITE_XN=False,
                                                 GATED=gated, W_FP8=fp8, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
        return time_us_graphed(run)

    rows = []
    for bn, bk, warps in [(dbn, dbk, dwarps)] + list(itertools.product([1, 2, 4, 8, 16], [256, 512, 1024, 2048],
                                                                       [4, 8])):
        if (bn, bk, warps) in [r[1:] for r in rows] or bk > D or tp * bn * bk > 32768 or time.time() > deadline:
            continue
        try:
            us = run_with(bn, bk, warps)
        except Exception as e:
            print(f"  BLOCK_N {bn} BLOCK_K {bk} warps {warps}: {type(e).__name__}")
            continue
        rows.append((us, bn, bk, warps))
        tag = " (default)" if len(rows) == 1 else ""
        print(f"  BLOCK_N {bn:2d} BLOCK_K {bk:4d} warps {warps}: {us:7.1f} us = {nbytes / us / 1e6:.2f} TB/s{tag}",
              flush=True)
    us, bn, bk, warps = min(rows)
    print(f"  best: BLOCK_N {bn} BLOCK_K {bk} warps {warps}: {us:.1f} us = {nbytes / us / 1e6:.2f} TB/s "
          f"(default {rows[0][0]:.1f} us)", flush=True)


def attention(n_slots: int, H: int, HKV: int, ring: bool):
    dev, dt = "cuda", torch.bfloat16
    DQK, DV, ROT = 192, 128, 64
    qkv = torch.randn(H * DQK + HKV * (DQK + DV), device=dev, dtype=dt)
    pos = torch.tensor([n_slots + 5 if ring else n_slots - 1], device=dev)
    cos = torch.randn(n_slots + 64, ROT, device=dev, dtype=dt)
    sin = torch.randn(n_slots + 64, ROT, device=dev, dtype=dt)
    k = torch.randn(HKV, n_slots, DQK, device=dev, dtype=dt)
    v = torch.randn(HKV, n_slots, DV, device=dev, dtype=dt)
    tpos = torch.arange(n_slots, device=dev) + (6 if ring else 0)
    tvalid = torch.ones(n_slots, device=dev, dtype=torch.uint8)
    o = torch.empty(H * DV, device=dev, dtype=dt)
    acc = torch.empty(16 * H * DV, device=dev, dtype=torch.float32)
    m = torch.empty(16 * H, device=dev, dtype=torch.float32)
    lsum = torch.empty(16 * H, device=dev, dtype=torch.float32)
    cnt = torch.zeros(HKV, device=dev, dtype=torch.int32)
    sink = torch.zeros(H, device=dev, dtype=torch.float32)
    nbytes = HKV * n_slots * (DQK + DV) * 2
    rep = H // HKV
    print(f"attention: {n_slots} slots, {H} heads, {HKV} kv heads ({'ring' if ring else 'full'}), "
          f"{nbytes / 1e6:.2f} MB of cache")
    for split, block_s, warps in itertools.product([64, 128, 256], [32, 64], [4, 8]):
        if block_s > split or split > n_slots:
            continue
        ns = -(-n_slots // split)
        if ns > 16:
            continue

        def run():
            dk.attn_kernel[(HKV, ns)](qkv, pos, cos, sin, k, v, tpos, tvalid, sink, o, acc, m, lsum, cnt, n_slots,
                                      n_slots, 128 if ring else 1 << 30, DQK ** -0.5, 1.0, H=H, HKV=HKV, DQK=DQK,
                                      DV=DV, ROT=ROT, RING=ring, HAS_SINK=True, NS=ns, NS_PAD=max(2, 1 << (ns - 1).bit_length()),
                                      REP_PAD=max(2, rep), SPLIT=split, BLOCK_R=16, BLOCK_D=256, BLOCK_S=block_s,
                                      PDL=False, num_warps=warps)
        try:
            t = time_us_graphed(run)
        except Exception as e:
            print(f"  split {split} BLOCK_S {block_s} warps {warps}: {type(e).__name__}: {str(e)[:100]}")
            continue
        print(f"  split {split:3d} ({ns:2d} programs per kv head) BLOCK_S {block_s:2d} warps {warps}: {t:6.2f} us",
              flush=True)


if __name__ == "__main__":
    print(torch.cuda.get_device_properties(0).name, torch.__version__)
    if "--multi" in sys.argv:  # the released MTP layer at T = 2 (K = 1 drafting): qkv, o_proj, gate/up, down
        end = time.time() + float(sys.argv[sys.argv.index("--multi") + 1]) if len(sys.argv) > 2 else float("inf")
        for N, D, fp8, gated in ((14848, 4096, True, False), (32768, 4096, True, False), (4096, 16384, True, True),
                                 (4096, 8192, False, False)):
            gemv_multi(N, D, 2, fp8, gated, end)
        sys.exit(0)
    attention(256, 16, 8, True)
    attention(832, 16, 4, False)
    for N, D in ((32000, 1024), (5632, 1024), (1024, 2048)):
        gemv(N, D)
