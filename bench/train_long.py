"""Long-sequence training on one device: the Trainer at 32k and 128k tokens per row, activation checkpointing.

Rows (each one sequence of random tokens, batch 1, MTP on, bf16 autocast on CUDA) run through the Trainer as
`mimo-flash train` runs them: the model built on the meta device and filled by the seeded init, AdamW,
clipping, balancing. "cp=1" goes through the context-parallel code path (a 1-rank process group:
shard_batch, cp_head_sums, ContextParallelAttention's halo exchange and K/V gather over one rank, positions
and segments given); "plain" is the ordinary path (a plain batch, the plain-batch attention kernels).
Per row: tokens/s over the timed steps (each step read back before the next: its own time), peak device
memory (torch.cuda.max_memory_allocated; peak RSS on a CPU). About 5 minutes on one H200 with the defaults.

    python bench/train_long.py [--preset mini] [--seqs 32768 131072] [--plain-seqs 32768] [--steps 3]
    python bench/train_long.py --preset tiny --seqs 256 --plain-seqs 256 --steps 1 --device cpu   # a check
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import time

import torch
import torch.distributed as dist

from common import end_rank, fmt, header, oom_safe, table

from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.distributed import ParallelContext
from mimo_flash.distributed.materialize import SeededInit
from mimo_flash.training import Document, TrainConfig, Trainer, pack_documents


def one_rank_group(device: torch.device) -> None:
    """A process group of this process alone (the CP path's collectives run over it)."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def context(device: torch.device, cp_path: bool) -> ParallelContext:
    if not cp_path:
        return ParallelContext(device=device)
    from torch.distributed.device_mesh import init_device_mesh

    one_rank_group(device)
    return ParallelContext(device=device, cp=1, cp_mesh=init_device_mesh(device.type, (1, 1),
                                                                          mesh_dim_names=("dp", "cp")))


def run(config: MiMoConfig, seq: int, cp_path: bool, steps: int, device: torch.device) -> dict | None:
    g = torch.Generator().manual_seed(seq)
    rows = pack_documents([Document(torch.randint(3, config.vocab_size, (seq,), generator=g).tolist())
                           for _ in range(steps + 1)], seq)
    cfg = TrainConfig(steps=steps + 1, batch_size=1, grad_accum=1, warmup_steps=1, lr=1e-4, bias_update_rate=1e-3,
                      activation_checkpointing=True, progress=False, plot=False, shuffle=False)
    with torch.device("meta"):
        model = MiMoForCausalLM(config)

    def go() -> dict:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        tr = Trainer(model, rows, cfg, context(device, cp_path), init=SeededInit(0))
        assert (tr.cp is not None) == cp_path and tr.plain_rows != cp_path
        t0 = time.perf_counter()
        first = tr.train_step()  # compiles / autotunes; not timed
        warm = time.perf_counter() - t0
        recs = [tr.train_step() for _ in range(steps)]
        dt = sum(r["step_time"] for r in recs)
        peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return {"tok_s": seq * steps / dt, "step_s": dt / steps, "peak_gb": peak / 1e9, "warm_s": warm,
                "loss": recs[-1]["loss"], "first_loss": first["loss"]}

    return oom_safe(go) if device.type == "cuda" else go()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--seqs", type=int, nargs="+", default=[32768, 131072], help="tokens per row, CP path")
    ap.add_argument("--plain-seqs", type=int, nargs="*", default=[32768], help="tokens per row, plain path")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per row (after one untimed)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    longest = max(args.seqs + args.plain_seqs)
    config = MiMoConfig.preset(args.preset)
    config = config.replace(max_position_embeddings=max(config.max_position_embeddings, longest))
    runs = [(s, True) for s in args.seqs] + [(s, False) for s in args.plain_seqs]
    rows = []
    for seq, cp_path in runs:
        r = run(config, seq, cp_path, args.steps, device)
        name = "cp=1 (CP path)" if cp_path else "plain"
        if r is None:
            rows.append([name, seq, "OOM", "", "", "", ""])
            continue
        rows.append([name, seq, fmt(r["tok_s"], ",.0f"), fmt(r["step_s"], ".3f"), fmt(r["peak_gb"], ".1f"),
                     fmt(r["warm_s"], ".1f"), f"{r['first_loss']:.3f} -> {r['loss']:.3f}"])
    table(f"Trainer, {args.preset} preset, one row per step, activation checkpointing, MTP on", header(),
          ["path", "tokens/row", "tokens/s", "s/step", "peak GB", "first step s", "loss"], rows,
          notes=["tokens/s over the timed steps, each step's own time (Trainer metrics)",
                 "peak: torch.cuda.max_memory_allocated (CUDA) or the process's peak RSS (CPU)",
                 "cp=1: the context-parallel path on a 1-rank process group; plain: the ordinary path"])
    end_rank()


if __name__ == "__main__":
    main()
