"""Where the host's time goes when it issues the mini preset's forward and backward (GPU, bf16).

The GPU waits on the host where the host issues kernels slower than they run (short prompts; small
kernels between large ones). This prints the host time of one forward and one backward, the cost of
single launches (a Triton kernel, a compiled fused op, an aten op), and cProfile's top functions of
one forward by own and by cumulative time.

    python bench/host_time.py [--tokens 4096] [--batch 4] [--top 40]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from train_step import build_ours

from mimo_flash import MiMoConfig
from mimo_flash.ops.compiled import kernels
from mimo_flash.ops.norm import rms_norm
from mimo_flash.ops.swiglu import silu_mul


def host_ms(fn, n: int = 20) -> float:
    """Host time per call of fn (no synchronisation inside the timed loop; one call first, to compile)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return host


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    model = build_ours(MiMoConfig.preset("mini"))
    ids = torch.randint(0, 32000, (args.batch, args.tokens), device="cuda")

    def fwd():
        return model(ids, labels=ids, return_logits=False).loss

    for _ in range(3):
        fwd().backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = fwd()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    print(f"host: forward issued in {(t1 - t0) * 1e3:.1f} ms, backward returned after {(t2 - t1) * 1e3:.1f} ms, "
          f"GPU done {(t3 - t2) * 1e3:.1f} ms later")
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(1024, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(0, 4096, (4096,), device="cuda")
    tk = kernels("moe")
    print(f"per call, host: Triton gather_sum {host_ms(lambda: tk.gather_sum(x, idx, 1)) * 1e3:.1f} us, "
          f"rms_norm (autograd function + Triton) {host_ms(lambda: rms_norm(x, w, 1e-6)) * 1e3:.1f} us, "
          f"compiled silu_mul {host_ms(lambda: silu_mul(x, x)) * 1e3:.1f} us, "
          f"aten add {host_ms(lambda: x + x) * 1e3:.1f} us")
    out_ = torch.empty_like(x)
    kern = tk._gather_sum_kernel  # the same launch through Triton's own path and through ops/kernels/launch.py's Launcher
    raw = getattr(kern, "fn", kern)
    print(f"one gather_sum kernel launch, host: Triton's path "
          f"{host_ms(lambda: raw[(4096, 1)](x, idx, out_, 1024, K=1, BLOCK_D=1024, num_warps=4)) * 1e3:.1f} us, "
          f"ops' Launcher {host_ms(lambda: kern[(4096, 1)](x, idx, out_, 1024, K=1, BLOCK_D=1024, num_warps=4)) * 1e3:.1f} us")
    model.zero_grad(set_to_none=True)
    prof = cProfile.Profile()  # the forward only: the backward's Python runs in autograd's own thread
    prof.enable()
    loss = fwd()
    prof.disable()
    loss.backward()
    torch.cuda.synchronize()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)
    print(out.getvalue())


if __name__ == "__main__":
    main()
