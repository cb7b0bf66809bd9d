"""The released MiMo-V2-Flash dimensions end to end on tensor x expert parallel GPUs, random FP8 weights built
directly sharded (issue #20): no checkpoint on disk, no whole copy of the model anywhere.

    # 8 H200s, the whole released model (48 layers, 3 MTP layers, 256 experts, FP8 128x128 blocks, 291.5 GiB;
    # plan: 40.1 GiB of weights per GPU at TP 2 x EP 4, 44.6 at TP 1 x EP 8):
    torchrun --nproc-per-node 8 bench/full_size.py --tp 2 --ep 4 --json full_size.json
    torchrun --nproc-per-node 8 bench/full_size.py --tp 1 --ep 8      # each rank generates 1/8 of the experts
    # 4 H200s (plan: 75.4 GiB of weights per GPU):
    torchrun --nproc-per-node 4 bench/full_size.py --tp 2 --ep 2
    # 1 H200, the released dimensions cut to 4 layers (22 GiB; checks every code path on one GPU):
    python bench/full_size.py --layers 4
    # the CPU check (tiny preset, gloo, seconds): what tests/test_full_size.py runs
    torchrun --nproc-per-node 2 bench/full_size.py --cpu-check --tp 2

The load is bound by the host generating random numbers (~0.3 G elements/s per thread measured on a shared
2-core CPU; --gen-threads, default this rank's share of the CPUs): under EP each rank generates only its experts
(1/ep of ~310 G), under TP it generates whole tensors and keeps its slices. --budget-s (default 540 s, for a
10-minute command) skips the measurements left when time runs out; --batch / --prompt / --ttft / --new cut the
grid.

Every rank loads its share of checkpoint.synthetic.SyntheticCheckpoint (the values write_synthetic_checkpoint
would write, generated tensor by tensor on the host as the loader reads them, FP8 kept resident) through
distributed.load_parallel. Then, one table each (rank 0 prints; --json also writes them), measured in the order
load, TTFT, largest context, decode (the decode grid, the longest part, last):
  * load: wall time (and how much of it was the host generating random tensors), weights per rank;
  * memory per GPU: parameter bytes, torch.cuda.max_memory_allocated / memory_reserved after the load and at
    the end of the run, per rank (gathered to rank 0), against `mimo-flash plan`'s prediction for the same
    layout (plan.py counts the weights from the model, but the MTP eh_proj as FP8 where the release stores it
    bf16: ~0.1 GiB per GPU under the measured weights at the released dims);
  * decode at each --batch x --prompt, plain and with K = min(3, MTP layers) speculative tokens: step time and
    tokens/s from the second of two identical generate() calls (the first captures the CUDA graphs); random
    weights accept no drafts, so the speculative rows give the break-even acceptance length = speculative step
    time / plain step time (the acceptance a trained model needs for speculation to pay);
  * TTFT (prefill + first token, batch 1) at each --ttft prompt length, after one short warm-up prefill;
  * the largest context that fits at batch 1: plan's arithmetic (generation.cache.cache_bytes of this rank's
    KV heads, MTP rings included, against the free memory left on the tightest rank, less plan's activation
    estimate) checked by allocating that KVCache on every rank (stepping down 10% while any rank cannot); capped
    at max_position_embeddings. Its KV bytes per rank.
Each measurement first allocates its KV cache (and plan's activation estimate) on every rank and all ranks
agree on whether that fits: a row that does not says OOM and the run goes on. (An OOM later inside a
measurement is caught too, but under NCCL the other ranks would then wait in a collective: the probe exists so
that this does not happen.) Rows skipped for --budget-s say so.
Timing on CUDA: generate()'s CUDA events; on the CPU the host clock.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import end_rank, fmt, header, table  # noqa: E402
from mimo_flash import MiMoConfig  # noqa: E402
from mimo_flash.checkpoint import SyntheticCheckpoint  # noqa: E402
from mimo_flash.distributed import init_inference, load_parallel  # noqa: E402
from mimo_flash.generation import KVCache, generate  # noqa: E402
from mimo_flash.generation.cache import cache_bytes  # noqa: E402
from mimo_flash.generation.engine import _RUNNERS  # noqa: E402
from mimo_flash.plan import GIB, Layout, activation_bytes, plan  # noqa: E402

T0 = time.perf_counter()
CPU_CHECK = dict(preset="tiny", batch=[1, 2], prompt=[16, 40], new=4, ttft=[24, 48], device="cpu")


class Run:
    """This rank's place in the run: rank, world, device, and the helpers every measurement shares."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    def log(self, *a) -> None:
        if self.rank == 0:
            print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        if self.world > 1:
            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True when `ok` on every rank."""
        if self.world == 1:
            return ok
        t = torch.tensor([1 if ok else 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def min_over_ranks(self, x: int) -> int:
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def gather(self, obj) -> list:
        """obj of every rank, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def free_bytes(self) -> int:
        """Memory this rank could still allocate: the GPU's free memory plus what the caching allocator holds
        unused; on the CPU the host's MemAvailable."""
        if self.cuda:
            free, _ = torch.cuda.mem_get_info(self.device)
            return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no MemAvailable in /proc/meminfo")

    def release(self, model) -> None:
        """Drop generate()'s kept runners (their KV caches and graph pools) and the allocator's cache."""
        _RUNNERS.pop(model, None)
        if self.cuda:
            torch.cuda.empty_cache()

    def memory(self) -> dict:
        if not self.cuda:
            return dict(max_allocated=None, reserved=None,
                        host_peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return dict(max_allocated=torch.cuda.max_memory_allocated(self.device),
                    reserved=torch.cuda.memory_reserved(self.device))


def gib(b: int | None) -> str:
    return fmt(None if b is None else b / GIB, ".4g")


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def probe(run: Run, model, batch: int, length: int, K: int, layout: Layout) -> bool:
    """Whether every rank can allocate the KV cache of `batch` x `length` tokens (K MTP rings) plus plan's
    activation estimate: allocated, freed, agreed over the ranks."""
    ok = True
    try:
        cache = KVCache(model.kv_config, batch, length, device=run.device, dtype=model.dtype, num_mtp=K, slack=2 * K + 16)
        act = torch.empty(activation_bytes(model.config, layout, batch), dtype=torch.uint8, device=run.device)
        del cache, act
    except Exception as e:  # noqa: BLE001 - anything but an OOM is a real failure
        if not is_oom(e):
            raise
        ok = False
    run.release(model)
    return run.all_ok(ok)


def guarded(run: Run, model, fn):
    """fn() -> its result, or "OOM" when this rank ran out of memory (see the module docstring)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        return "OOM"
    finally:
        run.release(model)


def measured_row(run: Run, args, model, layout: Layout, row: dict, batch: int, length: int, k: int, fn):
    """One table row's measurement: fn()'s stats, or None with row["status"] saying why not (the time budget
    spent, the KV cache of batch x length tokens (k MTP rings) and the activations not fitting on every rank, or
    an OOM on any rank while fn ran)."""
    if time.perf_counter() - T0 > args.budget_s:
        row["status"] = "skipped (budget)"
        return None
    if not probe(run, model, batch, length, k, layout):
        row["status"] = "OOM (KV cache + activations do not fit)"
        return None
    st = guarded(run, model, fn)
    if not run.all_ok(st != "OOM"):
        row["status"] = "OOM"
        return None
    return st


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def build_config(args) -> MiMoConfig:
    over = parse_set(args.set)
    if args.layers is not None:
        over["num_hidden_layers"] = args.layers
    if args.mtp is not None:
        over["num_nextn_predict_layers"] = args.mtp
    return MiMoConfig.preset(args.preset, **over)


def param_bytes(model) -> int:
    """Bytes of this rank's parameters and buffers (each storage once)."""
    seen = {}
    for t in model.state_dict().values():
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def load(run: Run, args, config: MiMoConfig, mesh):
    source = SyntheticCheckpoint(config, fp8=True, seed=args.seed, threads=args.gen_threads).open_reader()
    run.sync()
    t0 = time.perf_counter()
    model = load_parallel(source, tp=args.tp, ep=args.ep, device=run.device, mesh=mesh, dtype=args.dtype, fp8=True,
                          progress=run.rank == 0 and sys.stderr.isatty())
    run.sync()
    seconds = time.perf_counter() - t0
    return model, dict(seconds=seconds, generate_seconds=source.generate_seconds,
                       generated_gib=source.generated_bytes / GIB)


def decode_rows(run: Run, args, model, layout: Layout, K: int) -> list[dict]:
    """Plain and K-speculative decoding at each batch x prompt."""
    rows = []
    vocab = model.config.vocab_size
    for B in args.batch:
        for P in args.prompt:
            plain = None
            for k in ([0, K] if K else [0]):
                row = dict(batch=B, prompt=P, K=k)
                rows.append(row)
                ids = torch.randint(0, vocab, (B, P), generator=torch.Generator().manual_seed(B * 7919 + P))
                kw = dict(max_new_tokens=args.new, num_speculative_tokens=k, eos_token_id=[], return_stats=True)

                def measure():
                    generate(model, ids, **kw)  # captures the graphs of this shape
                    run.sync()
                    _, st = generate(model, ids, **kw)
                    run.sync()
                    return st

                st = measured_row(run, args, model, layout, row, B, P + args.new + 2 * k + 2, k, measure)
                if st is None:
                    continue
                step = st.decode_seconds / max(st.steps, 1)
                row.update(status="ok", step_ms=step * 1e3, steps=st.steps, tok_s=B * (args.new - 1) / st.decode_seconds,
                           acceptance_length=st.acceptance_length, prefill_s=st.prefill_seconds, runner=st.runner,
                           notes=list(st.notes))
                if k == 0:
                    plain = row
                elif plain is not None and plain.get("status") == "ok":
                    row["break_even"] = row["step_ms"] / plain["step_ms"]
                run.log(f"decode B={B} P={P} K={k}: {row['step_ms']:.2f} ms/step, {row['tok_s']:.1f} tok/s"
                        + (f", break-even acceptance length {row['break_even']:.2f}" if "break_even" in row else ""))
    return rows


def ttft_rows(run: Run, args, model, layout: Layout) -> list[dict]:
    rows = []
    vocab = model.config.vocab_size
    warm = torch.randint(0, vocab, (1, min(args.ttft + args.prompt)), generator=torch.Generator().manual_seed(5))
    guarded(run, model, lambda: generate(model, warm, max_new_tokens=1, eos_token_id=[]))  # kernels built, tuned
    run.sync()
    for P in args.ttft:
        row = dict(prompt=P)
        rows.append(row)
        if P + 1 > model.config.max_position_embeddings:
            row["status"] = f"longer than max_position_embeddings ({model.config.max_position_embeddings})"
            continue
        ids = torch.randint(0, vocab, (1, P), generator=torch.Generator().manual_seed(P))

        def measure():
            run.sync()
            _, st = generate(model, ids, max_new_tokens=1, eos_token_id=[], return_stats=True)
            run.sync()
            return st

        st = measured_row(run, args, model, layout, row, 1, P + 64, 0, measure)
        if st is None:
            continue
        row.update(status="ok", ttft_s=st.prefill_seconds, prefill_tok_s=P / st.prefill_seconds)
        run.log(f"TTFT {P} tokens: {st.prefill_seconds:.3f} s ({P / st.prefill_seconds:.0f} tok/s)")
    return rows


def largest_context(run: Run, model, layout: Layout, K: int) -> dict:
    """The longest batch-1 context whose KV cache (K MTP rings) fits on every rank (module docstring)."""
    kv = model.kv_config
    limit = model.config.max_position_embeddings
    per = lambda n: cache_bytes(kv, n, batch_size=1, dtype=model.dtype, num_mtp=K, slack=2 * K + 16)  # noqa: E731
    base, step = per(64), per(128) - per(64)  # full layers grow linearly, SWA rings are fixed
    run.release(model)
    free = run.min_over_ranks(run.free_bytes()) - activation_bytes(model.config, layout, 1)
    n = min(limit, 64 + (free - base) // max(step, 1) * 64) if free > base else 0
    capped = n == limit
    tries = []
    while n >= 64:
        ok = True
        try:
            cache = KVCache(kv, 1, n, device=run.device, dtype=model.dtype, num_mtp=K, slack=2 * K + 16)
            nbytes = cache.nbytes()
            del cache
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            ok = False
        run.release(model)
        tries.append(n)
        if run.all_ok(ok):
            return dict(status="ok", context=n, kv_bytes=nbytes, capped=capped, tries=tries,
                        method="plan arithmetic (cache_bytes vs free memory), checked by allocating the KVCache")
        n = n * 9 // 10 // 64 * 64
        capped = False
    return dict(status="OOM", context=0, kv_bytes=0, capped=False, tries=tries, method="none fits")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--layers", type=int, default=None, help="cut the preset to N decoder layers")
    ap.add_argument("--mtp", type=int, default=None, help="MTP layers (default: the preset's)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other config overrides (JSON values)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=None, help="default: the processes / tp")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt", type=int, nargs="+", default=[1024, 8192], help="decode prompt lengths")
    ap.add_argument("--new", type=int, default=32, help="tokens generated per decode measurement")
    ap.add_argument("--ttft", type=int, nargs="+", default=[8192, 32768], help="TTFT prompt lengths")
    ap.add_argument("--no-spec", action="store_true", help="plain decoding only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gen-threads", type=int, default=None,
                    help="host threads generating one tensor (default: this rank's share of the CPUs)")
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--budget-s", type=float, default=540.0, help="skip the measurements left after this many seconds")
    ap.add_argument("--json", default=None, help="also write every table's rows to this file (rank 0)")
    ap.add_argument("--cpu-check", action="store_true",
                    help="tiny preset on the CPU at tiny sizes: " + ", ".join(f"{k}={v}" for k, v in CPU_CHECK.items()))
    args = ap.parse_args(argv)
    if args.cpu_check:
        for k, v in CPU_CHECK.items():
            setattr(args, k, v)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args.ep = args.ep or max(1, world // args.tp)
    if args.gen_threads is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        args.gen_threads = max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    args.dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    mesh, dev = init_inference(args.tp, args.ep, device)
    run = Run(torch.device(dev))
    config = build_config(args)
    K = 0 if args.no_spec else min(3, config.num_nextn_predict_layers)
    layout = Layout(args.tp, args.ep, run.world)
    run.log(header())
    run.log(f"preset {args.preset}: {config.num_hidden_layers} layers, {config.num_nextn_predict_layers} MTP, "
            f"{config.n_routed_experts} experts; tp {args.tp} x ep {args.ep} = {run.world} rank(s) on {device}; "
            f"{args.gen_threads} generating thread(s) per rank")
    out = dict(header=header(), preset=args.preset, layers=config.num_hidden_layers, tp=args.tp, ep=args.ep,
               world=run.world, device=str(run.device), K=K)

    # ------------------------------------------------------------------ load
    model, ld = load(run, args, config, mesh)
    mem_load = run.memory()
    mine = param_bytes(model)
    run.log(f"loaded in {ld['seconds']:.1f} s ({ld['generate_seconds']:.1f} s generating on rank 0's host)")
    gpu_gib = (torch.cuda.get_device_properties(run.device).total_memory / GIB) if run.cuda else 141.0
    context = max(args.prompt) + args.new
    predicted = next(r for r in plan(config, run.world, gpu_gib, context, 1, fp8=True, mtp=K)["rows"]
                     if r["ep"] == args.ep and r["tp"] == args.tp)
    loads = run.gather(dict(ld, params=mine))
    out["load"] = loads
    if run.rank == 0:
        table("load", header(), ["rank", "load s", "of which generating s", "generated GiB", "weights GiB/rank",
                                 "plan weights GiB/rank"],
              [[r, fmt(x["seconds"], ".3g"), fmt(x["generate_seconds"], ".3g"), fmt(x["generated_gib"], ".4g"),
                gib(x["params"]), gib(predicted.get("weights"))] for r, x in enumerate(loads)],
              [f"{args.preset} preset, {config.num_hidden_layers} layers + {config.num_nextn_predict_layers} MTP, "
               f"FP8 128x128 blocks, random weights generated on the host as loaded (SyntheticCheckpoint, seed "
               f"{args.seed}), tp {args.tp} x ep {args.ep}",
               f"the tensors the release keeps unquantized in {str(args.dtype).removeprefix('torch.')} (plan counts "
               "bf16); plan counts the MTP eh_proj as FP8, the release stores it bf16"])

    # ------------------------------------------------------------------ measurements
    ttft = ttft_rows(run, args, model, layout)  # the cheap ones first: the decode grid may run out of --budget-s
    longest = largest_context(run, model, layout, K)
    decode = decode_rows(run, args, model, layout, K)
    longest["kv_bytes_per_rank"] = run.gather(longest["kv_bytes"])
    mem_end = run.memory()
    mems = run.gather(dict(load=mem_load, end=mem_end, params=mine))
    out.update(decode=decode, ttft=ttft, largest_context=longest, memory=mems,
               plan=dict(context=context, batch=1, K=K, **predicted))
    if run.rank == 0:
        peak = "max_allocated" if run.cuda else "host_peak_rss"
        table("memory per GPU", f"against `mimo-flash plan --preset {args.preset} --gpus {run.world} --batch 1 "
              f"--context {context} --mtp {K}` (row TP {args.tp} EP {args.ep})",
              ["rank", "weights GiB", "plan weights GiB", f"after load: {peak} GiB", "reserved GiB",
               f"end of run: {peak} GiB", "reserved GiB", "plan total GiB"],
              [[r, gib(m["params"]), gib(predicted.get("weights")), gib(m["load"][peak]), gib(m["load"].get("reserved")),
                gib(m["end"][peak]), gib(m["end"].get("reserved")), gib(predicted.get("total"))] for r, m in enumerate(mems)],
              ["plan total = weights + KV cache (batch 1) + activation, graph and runtime estimates; the end-of-run "
               f"peak covers every measurement (decode at batches up to {max(args.batch)}, whose KV cache this plan "
               "row does not count)"])
        rows = []
        for r in decode:
            ok = r.get("status") == "ok"
            rows.append([r["batch"], r["prompt"], r["K"], fmt(r.get("step_ms"), ".2f") if ok else r["status"],
                         fmt(r.get("tok_s"), ".1f") if ok else "", fmt(r.get("acceptance_length"), ".2f") if ok else "",
                         fmt(r.get("break_even"), ".2f") if ok and r["K"] else ""])
        table("decode", f"{args.new} new tokens per run, greedy, the second of two identical generate() calls",
              ["batch", "prompt", "K", "step ms", "tok/s", "acceptance length", "break-even acceptance length"], rows,
              ["tok/s = batch x (new - 1) / decode time; a K row's step is one speculative step (K drafts + "
               "verification); break-even = speculative step / plain step (random weights accept nothing)"])
        table("TTFT", "batch 1, prefill + first token (chunks of 512 tokens), after a warm-up prefill",
              ["prompt", "TTFT s", "prefill tok/s"],
              [[r["prompt"], fmt(r.get("ttft_s"), ".3f") if r["status"] == "ok" else r["status"],
                fmt(r.get("prefill_tok_s"), ".0f") if r["status"] == "ok" else ""] for r in ttft])
        table("largest context at batch 1", longest["method"],
              ["context", "KV bytes/rank (GiB)", "capped by max_position_embeddings", "contexts tried"],
              [[longest["context"] if longest["status"] == "ok" else "OOM",
                " ".join(gib(b) for b in longest["kv_bytes_per_rank"]),
                "yes" if longest["capped"] else "no", " ".join(map(str, longest["tries"]))]],
              [f"K={K} MTP rings included; free memory read after the TTFT runs (their caches freed), less plan's "
               "activation estimate"])
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))
        run.log("done")
    run.sync()
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except BaseException:  # (end_rank skips the interpreter's own report)
        traceback.print_exc()
        end_rank(False)
    end_rank(True, code)
