"""What a dependency between two consecutive kernels costs on the GPU, and what can replace the grid boundary.

    python bench/sync_links.py

A chain of L kernels, each a GEMV whose input is the previous kernel's output (as in the batch-1 decode step),
replayed in a CUDA graph. Modes of the link between kernel k-1 and kernel k:
  plain  no PDL: kernel k starts when kernel k-1 has ended
  pdl    programmatic dependent launch: kernel k's programs start early, load their first weights, and wait in
         griddepcontrol.wait until kernel k-1 has ended and flushed
  flag   PDL launch, no griddepcontrol.wait: every program of kernel k-1 adds 1 to a counter after its
         stores (release); kernel k's programs spin on that counter (acquire) until all have
Each mode's output is checked against plain; us per link = time per replay / L.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def link_kernel(x_ptr, w_ptr, y_ptr, sync_ptr, wait_idx, wait_n, own_idx, reset_idx, N,
                D: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, POLL: tl.constexpr):
    if MODE > 0:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D)
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], mask=(rows < N)[:, None], other=0.0,
                eviction_policy="evict_first")
    if MODE == 1:
        gdc_wait()
    if MODE == 2:
        if POLL == 0:
            c = tl.atomic_add(sync_ptr + wait_idx, 0, sem="acquire")
            while c < wait_n:
                c = tl.atomic_add(sync_ptr + wait_idx, 0, sem="acquire")
        else:
            c = tl.load(sync_ptr + wait_idx, volatile=True)
            while c < wait_n:
                c = tl.load(sync_ptr + wait_idx, volatile=True)
            tl.atomic_add(sync_ptr + wait_idx, 0, sem="acquire")
        if pid == 0:
            tl.atomic_xchg(sync_ptr + reset_idx, 0, sem="relaxed")
    x = tl.load(x_ptr + cols).to(tl.float32)
    y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(y_ptr + rows, (y * 0.03125).to(y_ptr.dtype.element_ty), mask=rows < N)
    if MODE == 2:
        tl.debug_barrier()
        tl.atomic_add(sync_ptr + own_idx, 1, sem="release")


def run(L: int, N: int, D: int, block_n: int, mode: int, poll: int, warps: int, reps: int = 5):
    dev = "cuda"
    g0 = torch.Generator(device=dev).manual_seed(0)
    ws = [torch.randn(N, D, device=dev, dtype=torch.bfloat16, generator=g0) for _ in range(L)]
    bufs = [torch.randn(max(N, D), device=dev, dtype=torch.bfloat16, generator=g0)] + [
        torch.zeros(max(N, D), device=dev, dtype=torch.bfloat16) for _ in range(L)]
    n_prog = -(-N // block_n)
    sync = torch.zeros(L, device=dev, dtype=torch.int32)
    sync[L - 2:] = n_prog  # the state between two replays: the last two kernels' counters full

    def chain():
        for k in range(L):
            link_kernel[(n_prog,)](bufs[k], ws[k], bufs[k + 1], sync, (k - 1) % L, n_prog, k, (k - 2) % L, N,
                                   D=D, BLOCK_N=block_n, MODE=mode, POLL=poll, num_warps=warps,
                                   launch_pdl=mode > 0)

    chain()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        chain()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return sorted(ts)[reps // 2], bufs[L].float().clone(), sync.clone()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--links", type=int, default=74)
    args = p.parse_args()
    L = args.links
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for N, D, bn, warps in [(1024, 1024, 4, 4), (4096, 1024, 16, 4), (8192, 1024, 16, 8), (256, 1024, 2, 4)]:
        mb = N * D * 2 / 1e6
        t0, ref, _ = run(L, N, D, bn, 0, 0, warps)
        line = [f"N={N} D={D} ({mb:.1f} MB/kernel, {-(-N // bn)} programs):  plain {t0 / L:.2f} us/link"]
        for name, mode, poll in [("pdl", 1, 0), ("flag-atomic", 2, 0), ("flag-volatile", 2, 1)]:
            t, out, sync = run(L, N, D, bn, mode, poll, warps)
            err = (out - ref).abs().max().item()
            state = "ok" if sync[:L - 2].eq(0).all() and sync[L - 2:].eq(-(-N // bn)).all() else "BAD-STATE"
            line.append(f"{name} {t / L:.2f} ({'exact' if err == 0 else f'ERR {err:.3g}'}, {state})")
        print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
