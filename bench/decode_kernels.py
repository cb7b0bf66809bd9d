"""Block shapes of the batch-1 decode kernels (generation/kernels.py), timed one kernel at a time on the GPU.

    python bench/decode_kernels.py           # gemv_kernel and attn_kernel at the mini preset's shapes
    python bench/decode_kernels.py --released [SECONDS]  # FP8 gemv_kernel and gemv_multi_kernel (the MTP layer's
                                                         # two tokens) at the released shapes, each sweep cut at SECONDS

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


def _weights(N: int, D: int, fp8: bool):
    """A random [N, D] weight (FP8 with 128x128 block scales s, or bf16 with s None), its bytes, and the time of
    bf16 F.linear on one token of it (of the dequantized weight for FP8)."""
    w = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
    s = torch.rand(-(-N // 128), -(-D // 128), device="cuda") + 0.5 if fp8 else None
    x = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
    ref = time_us_graphed(lambda: F.linear(x, w))
    if fp8:
        w = w.clamp(-448, 448).to(torch.float8_e4m3fn)
    return w, s, N * D * w.element_size(), ref


def _sweep(run_with, default: tuple, candidates, nbytes: int, deadline: float) -> None:
    """Time run_with(bn, bk, warps) for the default block shapes, then each candidate until the deadline."""
    rows = []
    for bn, bk, warps in [default] + list(candidates):
        if (bn, bk, warps) in [r[1:] for r in rows] or (rows and time.time() > deadline):
            continue
        try:
            us = run_with(bn, bk, warps)
        except Exception as e:
            print(f"  BLOCK_N {bn} BLOCK_K {bk} warps {warps}: {type(e).__name__}")
            continue
        rows.append((us, bn, bk, warps))
        tag = " (default)" if len(rows) == 1 else ""
        print(f"  BLOCK_N {bn:2d} BLOCK_K {bk:4d} warps {warps:2d}: {us:7.2f} us = {nbytes / us / 1e6:.2f} TB/s{tag}",
              flush=True)
    us, bn, bk, warps = min(rows)
    print(f"  best: BLOCK_N {bn} BLOCK_K {bk} warps {warps}: {us:.2f} us = {nbytes / us / 1e6:.2f} TB/s "
          f"(default {rows[0][0]:.2f} us)", flush=True)


def _default_blocks(N: int, D: int, fp8: bool, tile: int | None = None) -> tuple[int, int, int]:
    from mimo_flash.generation.triton_step import gemv_blocks
    from mimo_flash.options import options

    t = options().triton_step
    bn, bk = gemv_blocks(N, D, tile, t, fp8)
    return bn, bk, t.num_warps if N * D >= 1 << 24 else t.small_gemv_warps


def gemv(N: int, D: int, fp8: bool = False, deadline: float = float("inf")):
    """gemv_kernel (one token) over [N, D]: the block shapes triton_step's gemv_blocks picks, then a sweep."""
    w, s, nbytes, ref = _weights(N, D, fp8)
    x = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    nw = torch.ones(D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(N, device="cuda", dtype=torch.bfloat16)
    pmax = torch.zeros(8, device="cuda", dtype=torch.float32)
    cnt = torch.zeros(8, device="cuda", dtype=torch.int32)
    print(f"GEMV {N} x {D}, {'fp8' if fp8 else 'bf16'}: {nbytes / 1e6:.0f} MB (bf16 F.linear: {ref:.2f} us)")

    def run_with(bn, bk, warps):
        n_prog = -(-N // bn)
        return time_us_graphed(lambda: dk.gemv_kernel[(n_prog,)](
            x, nw, w, w if s is None else s, out, out, out, pmax, cnt, cnt, cnt, N, 1e-6,
            0 if s is None else s.stride(0), D=D, HAS_NORM=True, HAS_RES=False, WRITE_XN=False, ARGMAX=False,
            W_FP8=fp8, NPROG=n_prog, BLOCK_N=bn, BLOCK_K=bk, BLOCK_P=2, PDL=False, num_warps=warps))

    f = 4 if fp8 else 1
    cands = [(bn, bk, wp) for bn, bk, wp in itertools.product([2, 4, 8, 16, 32], [256, 512, 1024, 2048, 4096], [4, 8])
             if bk <= D and 256 <= bn * bk <= 16384 * f]
    _sweep(run_with, _default_blocks(N, D, fp8), cands, nbytes, deadline)


def gemv_multi(N: int, D: int, T: int, fp8: bool, gated: bool, deadline: float = float("inf")):
    """gemv_multi_kernel over [N, D] for T tokens (gated: the dense MLP's down projection, x [T, 2D]): the block
    shapes triton_step's _gemv_multi picks, then a sweep."""
    w, s, nbytes, ref = _weights(N, D, fp8)
    tp = max(2, 1 << (T - 1).bit_length())
    x = torch.randn(T, 2 * D if gated else D, device="cuda", dtype=torch.bfloat16)
    nw = torch.ones(D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(T, N, device="cuda", dtype=torch.bfloat16)
    print(f"gemv_multi {N} x {D}, T {T}, {'fp8' if fp8 else 'bf16'}{', gated' if gated else ''}: {nbytes / 1e6:.0f} MB"
          f" (bf16 F.linear, one token: {ref:.2f} us)", flush=True)

    def run_with(bn, bk, warps):
        return time_us_graphed(lambda: dk.gemv_multi_kernel[(-(-N // bn),)](
            x, nw, w, w if s is None else s, out, out, out, N, 1e-6, 0 if s is None else s.stride(0), x.stride(0),
            out.stride(0), T=T, T_PAD=tp, D=D, HAS_NORM=not gated, HAS_RES=False, WRITE_XN=False, GATED=gated,
            W_FP8=fp8, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps))

    from mimo_flash.options import options
    cands = [(bn, bk, wp) for bn, bk, wp in itertools.product([1, 2, 4, 8, 16], [256, 512, 1024, 2048], [4, 8])
             if bk <= D and tp * bn * bk <= 32768]
    _sweep(run_with, _default_blocks(N, D, fp8, options().triton_step.tile // tp), cands, nbytes, deadline)


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
                                      PDL=False, pfa_ptr=acc, pfa_n=0, pfb_ptr=acc, pfb_n=0, dummy_ptr=acc,
                                      PF_CHUNK=32768, write_ptr=pos, HAS_WRITE=False, num_warps=warps)
        try:
            t = time_us_graphed(run)
        except Exception as e:
            print(f"  split {split} BLOCK_S {block_s} warps {warps}: {type(e).__name__}: {str(e)[:100]}")
            continue
        print(f"  split {split:3d} ({ns:2d} programs per kv head) BLOCK_S {block_s:2d} warps {warps}: {t:6.2f} us",
              flush=True)


if __name__ == "__main__":
    print(torch.cuda.get_device_properties(0).name, torch.__version__)
    if "--released" in sys.argv:  # the released dims' batch-1 GEMVs, FP8 as released, and the MTP layer's at T = 2
        i = sys.argv.index("--released")
        each = float(sys.argv[i + 1]) if len(sys.argv) > i + 1 else float("inf")
        for N, D, fp8 in ((14848, 4096, True), (32768, 4096, True), (4096, 8192, False)):  # q/k/v, gate/up, o_proj
            gemv(N, D, fp8, time.time() + each)
        for N, D, fp8, gated in ((14848, 4096, True, False), (32768, 4096, True, False), (4096, 16384, True, True),
                                 (4096, 8192, False, False)):
            gemv_multi(N, D, 2, fp8, gated, time.time() + each)
        sys.exit(0)
    attention(256, 16, 8, True)
    attention(832, 16, 4, False)
    for N, D in ((32000, 1024), (5632, 1024), (1024, 2048)):
        gemv(N, D)
