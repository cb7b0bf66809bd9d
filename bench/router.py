"""The router's choice kernel (ops/kernels/router.py) at decode and prefill sizes, by block shape, against the
ranks that the CPU path computes (ops/moe.py route_decode, compiled); with --decode, a decode step's norm and
router compiled together, the logits either way (route_decode's ROUTER_FUSED_MACS).

    python bench/router.py [--tokens 1 16 64 128 ...] [--experts 64 256] [--decode]

Given fp32 logits [N, E] and top 8: every (rows per program, warps) of the choice kernel, each checked to choose
the ranks' experts, and the kernel's current shape (`_router_meta`). --decode: the residual add and norm before a
MoE layer's router and route_decode, compiled as a decode step traces them, at 64 / 128 / 256 rows of the mini
preset's (1024 wide, 64 experts) and the released model's (4096, 256) sizes, with the logits as a reduction fused
into the norm against one fp32 product. us per call: 20 calls captured in a CUDA graph, the median of 5 replays
(bench/common.py time_us_graphed)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import header, time_us_graphed  # noqa: E402
from mimo_flash.ops import moe  # noqa: E402
from mimo_flash.ops.kernels import router as R  # noqa: E402


def ranks(logits: torch.Tensor, bias: torch.Tensor, k: int):
    """route_decode's choice off CUDA (the ranks), from the logits."""
    E = logits.shape[1]
    scores = logits.sigmoid()
    choice = scores + bias
    ar = torch.arange(E, device=logits.device)
    beats = (choice[:, None, :] > choice[:, :, None]) | (
        (choice[:, None, :] == choice[:, :, None]) & (ar[None, None, :] < ar[None, :, None]))
    onehot = beats.sum(-1)[:, :, None] == torch.arange(k, device=logits.device)
    idx = (onehot * ar[None, :, None]).sum(1)
    w = scores.gather(1, idx)
    return idx, w / (w.sum(-1, keepdim=True) + 1e-20)


def kernel(logits, bias, k: int, block_n: int, warps: int):
    N, E = logits.shape
    idx = torch.empty(N, k, device=logits.device, dtype=torch.long)
    w = torch.empty(N, k, device=logits.device, dtype=torch.float32)
    sel, counts = torch.empty_like(w), torch.zeros(1, device=logits.device, dtype=torch.int64)
    R._router_choose_kernel[(triton.cdiv(N, block_n),)](
        logits, bias, idx, w, sel, counts, N, 1.0, E=E, K=k, KP=max(2, triton.next_power_of_2(k)), NORM=True,
        COUNT=False, BLOCK_N=block_n, PARTS=1, num_warps=warps)
    return idx, w


def decode_router(rows=(64, 128, 256), sizes=((1024, 64), (4096, 256)), k: int = 8, device: str = "cuda") -> None:
    """route_decode after the residual add and norm, compiled, with the logits fused into the norm (a reduction)
    and as one fp32 product (F.linear): us per call and the share of rows choosing the same experts."""
    from mimo_flash.ops.norm import add_rms_norm

    def step(h, y, norm_w, router_w, bias):
        h2, xn = add_rms_norm.plain(h, y, norm_w, 1e-6)
        idx, w, _ = moe.route_decode(xn, router_w, bias, k, True, 2.5)
        return h2, idx, w

    for D, E in sizes:
        g = torch.Generator(device=device).manual_seed(D + E)
        norm_w = 1 + 0.1 * torch.randn(D, generator=g, device=device).bfloat16()
        router_w = torch.randn(E, D, generator=g, device=device) * D ** -0.5
        bias = torch.randn(E, generator=g, device=device) * 0.01
        for N in rows:
            h, y = (torch.randn(N, D, generator=g, device=device).bfloat16() for _ in range(2))
            res = {}
            for name, macs in (("fused", 1 << 62), ("product", 0)):
                moe.ROUTER_FUSED_MACS = macs  # (read when the step is traced: a fresh compile for each)
                torch._dynamo.reset()
                fn = torch.compile(step)
                res[name] = (fn(h, y, norm_w, router_w, bias)[1], time_us_graphed(lambda: fn(h, y, norm_w, router_w,
                                                                                          bias)))
            same = (res["fused"][0].sort(-1).values == res["product"][0].sort(-1).values).all(-1).float().mean()
            print(f"decode router D {D} E {E} N {N:4d}: logits fused into the norm {res['fused'][1]:6.1f} us | "
                  f"one fp32 product {res['product'][1]:6.1f} us | rows choosing the same experts {same:.3f}",
                  flush=True)
    moe.ROUTER_FUSED_MACS = ROUTER_FUSED_MACS


ROUTER_FUSED_MACS = moe.ROUTER_FUSED_MACS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 128, 256, 1024, 8192])
    ap.add_argument("--experts", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--decode", action="store_true", help="only the decode step's norm and router, both ways")
    args = ap.parse_args()
    print(header(), flush=True)
    k = args.top_k
    if args.decode:
        decode_router(k=k)
        return
    compiled = torch.compile(ranks)
    for E in args.experts:
        g = torch.Generator(device="cuda").manual_seed(E)
        bias = torch.randn(E, generator=g, device="cuda") * 0.01
        for N in args.tokens:
            logits = torch.randn(N, E, generator=g, device="cuda")
            want = ranks(logits, bias, k)[0]
            t_ranks = time_us_graphed(lambda: compiled(logits, bias, k))
            grid, meta = R._router_meta(N, E, k, True)
            t_now = time_us_graphed(lambda: R.choose_topk(logits, bias, k, True, 1.0))
            rows = []
            for block_n in (1, 2, 4, 8, 16, 32, 64):
                for warps in (1, 2, 4, 8):
                    if block_n * E < 32 * warps or block_n > max(1, triton.next_power_of_2(N)):
                        continue
                    got = kernel(logits, bias, k, block_n, warps)[0]
                    if not torch.equal(got, want):
                        raise SystemExit(f"E {E}, N {N}, {block_n} rows x {warps} warps: not the ranks' experts")
                    rows.append((time_us_graphed(lambda: kernel(logits, bias, k, block_n, warps)), block_n, warps))
            rows.sort()
            best = ", ".join(f"{b} x {w}: {t:.1f}" for t, b, w in rows[:4])
            print(f"E {E:3d} N {N:5d}: ranks compiled {t_ranks:6.1f} us | kernel now ({meta['BLOCK_N']} rows x "
                  f"{meta['num_warps']} warps, {grid} programs) {t_now:6.1f} us | best (rows x warps: us) {best}",
                  flush=True)
    print(f"(route_decode takes the kernel on CUDA; logits as one product above {moe.ROUTER_FUSED_MACS} "
          "multiply-adds)")


if __name__ == "__main__":
    main()
