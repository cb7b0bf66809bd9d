"""Distributed training on one host: correctness of FSDP2 and expert parallelism against one process,
then training throughput (tokens/s) on 1 GPU, 2 GPUs with FSDP2, and 2 GPUs with FSDP2 + EP=2.

    python bench/train_dist.py [--nproc 2] [--device cuda|cpu] [--preset mini] [--layers 12]
                               [--seq 2048] [--batch 4] [--steps 8] [--out DIR]

The driver launches `torch.distributed.run` twice (1 process, then --nproc processes); each worker
runs the trainer (mimo_flash.training.Trainer), writes its results as JSON, and the driver prints a
table. Checks: the tiny preset in fp32 on random packed documents, the loss curve of every
multi-process layout compared with the 1-process one (max relative difference). Timing: the given
preset, bf16 autocast (fp32 master weights), MTP on, median step time after warm-up.
On CPUs (--device cpu, gloo) it runs the same flow at small sizes, for debugging.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def synthetic_rows(vocab: int, seq: int, n_rows: int, seed: int = 0):
    """Random documents of random lengths (up to 2 rows) packed into n_rows rows of seq tokens."""
    import torch

    from mimo_flash.training import Document, pack_documents

    g = torch.Generator().manual_seed(seed)
    docs, total = [], 0
    while total < n_rows * seq:
        n = int(torch.randint(16, 2 * seq, (1,), generator=g))
        docs.append(Document(torch.randint(3, vocab, (n,), generator=g).tolist()))
        total += n
    rows = pack_documents(docs, seq)
    return rows


def worker(args) -> None:
    """One rank: the fp32 checks, then the timed runs; results to args.out/rank{r}-world{w}.json."""
    import torch
    import torch.distributed as dist

    from mimo_flash import MiMoConfig, MiMoForCausalLM
    from mimo_flash.training import TrainConfig, Trainer, init_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    results = {"world": world}
    layouts = [1] if world == 1 else [1, world]  # ep sizes

    # ---- correctness: tiny preset, fp32, the same global batch whatever the world size
    check_rows = synthetic_rows(512, 128, 64, seed=1)
    for ep in layouts:
        ctx = init_distributed(ep=ep, device=args.device)
        torch.manual_seed(0)
        model = MiMoForCausalLM(MiMoConfig.preset("tiny"))
        cfg = TrainConfig(steps=args.check_steps, batch_size=8 // world, warmup_steps=2,
                          lr=3e-3, bias_update_rate=1e-2, dtype="float32", progress=False, plot=False)
        hist = Trainer(model, check_rows, cfg, ctx).fit()
        results[f"check_ep{ep}"] = [r["loss"] for r in hist]
        results[f"check_maxvio_ep{ep}"] = [r["load_maxvio"] for r in hist]
        del model

    # ---- throughput
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    config = MiMoConfig.preset(args.preset, **overrides)
    rows = synthetic_rows(config.vocab_size, args.seq, max(64, 2 * args.batch * world * (args.steps + args.warmup)))
    for ep in layouts:
        ctx = init_distributed(ep=ep, device=args.device)
        torch.manual_seed(0)
        with torch.device(ctx.device):
            model = MiMoForCausalLM(config)
        results["params"] = [model.num_parameters(), model.num_parameters(active=True)]
        cfg = TrainConfig(steps=args.warmup + args.steps, batch_size=args.batch, warmup_steps=2, lr=3e-4,
                          bias_update_rate=1e-3, activation_checkpointing=args.ac, progress=False, plot=False)
        tr = Trainer(model, rows, cfg, ctx)
        times = []
        for _ in range(cfg.steps):
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            rec = tr.train_step()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        step = statistics.median(times[args.warmup:])
        tokens = tr.rows_per_step * rows.seq_len
        mem = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else 0.0
        results[f"time_ep{ep}"] = {"step_s": step, "tokens_per_step": tokens, "tokens_per_s": tokens / step,
                                   "max_mem_gib": mem, "last_loss": rec["loss"]}
        del tr, model
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(ctx.device)
    if rank == 0:
        Path(args.out, f"world{world}.json").write_text(json.dumps(results))
    from common import end_rank
    end_rank()


def launch(nproc: int, args) -> dict:
    from common import torchrun

    argv = ["--device", args.device, "--preset", args.preset, "--seq", str(args.seq), "--batch", str(args.batch),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--check-steps", str(args.check_steps),
            "--out", args.out] + (["--layers", str(args.layers)] if args.layers else []) + (["--ac"] if args.ac else [])
    t0 = time.perf_counter()
    rc = torchrun(Path(__file__).resolve(), nproc, argv, args.device)
    if rc:
        raise SystemExit(f"the {nproc}-process run failed (exit status {rc})")
    res = json.loads(Path(args.out, f"world{nproc}.json").read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--preset", default="mini")
    p.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (0: the preset's)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4, help="rows per GPU per step")
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--check-steps", type=int, default=8)
    p.add_argument("--ac", action="store_true", help="activation checkpointing in the timed runs")
    p.add_argument("--out", default=None, help="directory for the JSON results (default: a temporary one)")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    args.out = args.out or tempfile.mkdtemp(prefix="train-dist-")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    import torch

    dev = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"device: {dev} x{args.nproc}; date: {date}; torch {torch.__version__}; command: python "
          + " ".join(sys.argv), flush=True)
    one = launch(1, args)
    many = launch(args.nproc, args)

    def rel(a, b):
        return max(abs(x - y) / abs(y) for x, y in zip(a, b))

    ref = one["check_ep1"]
    print(f"\nchecks (tiny preset, fp32, {len(ref)} steps, global batch 8 x 128): loss "
          f"{ref[0]:.4f} -> {ref[-1]:.4f} on 1 process")
    summary = {"device": dev, "nproc": args.nproc, "date": date, "args": vars(args), "one": one, "many": many}
    for ep in (1, args.nproc):
        name = f"{args.nproc} processes, FSDP2" + (f" + EP={ep}" if ep > 1 else "")
        d = rel(many[f"check_ep{ep}"], ref)
        same_load = many[f"check_maxvio_ep{ep}"] == one["check_maxvio_ep1"]
        summary[f"check_rel_ep{ep}"] = d
        print(f"  {name:<32} loss curve max rel diff vs 1 process {d:.1e}; expert loads identical: {same_load}")
    total, active = one["params"]
    print(f"\nthroughput ({args.preset}{f', {args.layers} layers' if args.layers else ''}: {total / 1e9:.2f}B "
          f"parameters, {active / 1e9:.2f}B active; {'bf16 autocast' if args.device == 'cuda' else 'fp32'}, MTP on, "
          f"seq {args.seq}, {args.batch} rows per GPU, median of {args.steps} steps after {args.warmup})")
    print(f"  {'layout':<32} {'step s':>8} {'tokens/s':>12} {'per GPU':>10} {'max GiB':>8} {'loss':>7}")
    rows = [("1 GPU", one["time_ep1"], 1)] + [
        (f"{args.nproc} GPUs, FSDP2" + (f" + EP={ep}" if ep > 1 else ""), many[f"time_ep{ep}"], args.nproc)
        for ep in (1, args.nproc)]
    for name, t, n in rows:
        print(f"  {name:<32} {t['step_s']:8.3f} {t['tokens_per_s']:12,.0f} {t['tokens_per_s'] / n:10,.0f} "
              f"{t['max_mem_gib']:8.1f} {t['last_loss']:7.3f}")
    Path(args.out, "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nresults: {Path(args.out, 'summary.json')}")


if __name__ == "__main__":
    main()
