"""Attention forward + backward through the context-parallel path at CP=1 (one GPU) against the plain op.

The released model's attention shapes (64 heads; Q/K 192, V 128; SWA: 8 kv heads, window 128 keys, sink;
full: 4 kv heads, no sink), bf16, one sequence of T tokens. CP=1 still runs the halo all-to-all (to itself)
and the [halo + chunk] layout, so this measures what the CP code path costs over the plain call.

    python bench/cp_attention.py [--tokens 32768,131072]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from common import end_rank, header, time_ms

from mimo_flash.distributed.context_parallel import ContextParallel, ContextParallelAttention
from mimo_flash.ops.attention import AttnMeta, attention


def run(T: int, swa: bool, dev: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> tuple[float, float, float]:
    H, Hkv, Dqk, Dv = (64, 8, 192, 128) if swa else (64, 4, 192, 128)
    window = 128 if swa else None
    q = torch.randn(1, H, T, Dqk, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(1, Hkv, T, Dqk, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(1, Hkv, T, Dv, device=dev, dtype=dtype, requires_grad=True)
    sink = torch.randn(H, device=dev, requires_grad=True) if swa else None
    pos = torch.arange(T, device=dev)[None]
    meta = AttnMeta(q_pos=pos, k_pos=pos, plain=True)
    cp = ContextParallelAttention(ContextParallel())
    go = torch.randn(1, H, T, Dv, device=dev, dtype=dtype)

    def step(fn):
        out = fn(q, k, v, meta, Dqk ** -0.5, window, sink)
        out.backward(go)
        return out

    plain = time_ms(lambda: step(attention))
    ours = time_ms(lambda: step(cp.attention))
    torch.cuda.reset_peak_memory_stats()
    step(cp.attention)
    return plain, ours, torch.cuda.max_memory_allocated() / 2 ** 30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="32768,131072")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/cp_attention.py needs a CUDA GPU")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl", rank=0, world_size=1)
    print(header())
    print("| layer | tokens | plain op ms | CP=1 path ms | CP path peak GiB |")
    print("|---|---|---|---|---|")
    for T in (int(t) for t in args.tokens.split(",")):
        for swa in (True, False):
            plain, ours, peak = run(T, swa)
            print(f"| {'SWA' if swa else 'full'} | {T} | {plain:.1f} | {ours:.1f} | {peak:.1f} |", flush=True)
    end_rank()


if __name__ == "__main__":
    main()
