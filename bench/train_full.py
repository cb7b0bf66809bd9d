"""Training at the released MiMo-V2-Flash dimensions on the GPUs of one host, cut to as many layers as fit
(issue #22): per layout and sequence length tokens/s, TFLOP/s and peak memory per GPU; then a DCP checkpoint
written on one layout and resumed on another, its loss curve beside the run that never stopped.

    # 8 GPUs, everything in one command (the default layouts for --nproc 8 are these four)
    python bench/train_full.py --nproc 8 --fit --layouts w8-ep8 w8-ep4 w8-ep8-cp2 w8-ep8-cp4 \
        --seqs 4096 32768 --cp-seqs 65536 131072 --reshard 8:4 4:8 --check-dir /big/disk --json full8.json
    # the same in parts, where one command may run at most ~10 minutes (a row takes 1-3 minutes: start-up, the
    # seeded init of ~6 G parameters a rank on the CPU, 5 steps); after one --fit run, fix --layers N
    python bench/train_full.py --nproc 8 --fit --layouts w8-ep8 --seqs 4096 32768
    python bench/train_full.py --nproc 8 --layers N --layouts w8-ep4 --seqs 4096 32768
    python bench/train_full.py --nproc 8 --layers N --layouts w8-ep8-cp2 w8-ep8-cp4 --cp-seqs 65536 131072
    python bench/train_full.py --nproc 8 --layouts --reshard 8:4 4:8 --check-dir /big/disk
    # 4 GPUs
    python bench/train_full.py --nproc 4 --fit --layouts w4-ep4 w4-ep2 --seqs 4096 32768
    python bench/train_full.py --nproc 4 --layers N --layouts w4-ep4-cp2 w4-ep4-cp4 --cp-seqs 65536 131072
    python bench/train_full.py --nproc 4 --layouts --reshard 4:2 2:4 --check-dir /big/disk
    # 1 GPU: the code paths at the flash widths, 32 experts instead of 256, 3 layers (~65 GiB of state; 32k may
    # read OOM: four heads' logits), then a same-layout resume (no process group: DCP's single-process path)
    python bench/train_full.py --nproc 1 --layouts w1 --layers 3 --set n_routed_experts=32 --seqs 4096 16384 32768 \
        --reshard 1:1 --check-set n_routed_experts=32
    # CPU check of the whole flow (gloo, tiny preset, ~15 s a launch here)
    python bench/train_full.py --device cpu --preset tiny --nproc 4 --layouts w4-ep4 w4-ep2-cp2 --seqs 64 \
        --cp-seqs 128 --steps 2 --warmup 1 --reshard 4:2 2:4 --check-seq 64 --check-lr 1e-2

Layouts: `w{W}[-ep{E}][-cp{C}]`: W processes, FSDP2 over all W (everything but the routed experts), the routed
experts split over E of them and each split FSDP2-sharded over the W / E ranks that share it (every rank holds
1 / W of the experts), each row split over C of them (context parallelism;
the W / C data-parallel groups read different rows); a bare number N is wN-epN. Defaults for --nproc N:
wN-epN, wN-ep(N/2), wN-epN-cp2, wN-epN-cp4. Layouts with C > 1 run the --cp-seqs, the others the --seqs.

Each (layout, sequence length) row is its own torchrun launch (common.torchrun): the workers build the model on
the meta device, shard it (parallelize_for_training: EP, activation checkpointing, FSDP2) and fill only their
shards (SeededInit); the Trainer runs --warmup + --steps steps (bf16 autocast, fp32 master weights and AdamW
state, MTP on, one document per row, --batch rows per data-parallel rank). A rank that runs out of memory ends
its launch (torchrun stops the others) and the row reads OOM; the next row starts afresh. On GPUs the workers run
with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless it is set.
Per row: tokens/s per GPU = tokens per step / median step time / W; TFLOP/s per GPU = model_flops (bench/common.py)
/ median step time / W; peak = max over ranks of torch.cuda.max_memory_allocated (the process's peak RSS on CPUs).
--fit: per layout, the most layers (at most the preset's) whose training state (16 bytes a parameter: fp32
weights, gradients, two AdamW moments; everything / W) fills at most --fit-fraction of a GPU, then one
fewer at a time until the layout's longest sequence runs; its other sequences run at that depth.

Resharding check (--reshard A:B, layouts as above): a reference run on A trains 2 S steps (S = --check-steps),
writing a DCP checkpoint at step S; a run on B resumes from it and trains steps S + 1 .. 2 S. Both from the
seeded init on the same data (rows of repeated motifs, so the loss falls), the same global batch (--check-batch
rows a step), --check-dtype (float32: the layouts differ only in the order of their sums), --check-layers layers
(a checkpoint holds 12 bytes a parameter: ~108 GB at the flash widths with 2 layers, written under --check-dir,
default --out, a temporary directory; it is deleted once no later pair reads it).
It passes when every resumed loss is within --check-tol (relative) of the reference's; the exit status is 1 when
a check fails or a row fails for another reason than memory.
(Over 500 lines, a sixth of them this docstring: one bench's layouts, workers, driver, checks and tables.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common import end_rank, fmt, model_flops, read_rank_results, table, torchrun, write_rank_result

from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.distributed import leave_distributed

SCRIPT = Path(__file__).resolve()
STATE_BYTES = 16  # per parameter: fp32 weight, fp32 gradient, AdamW's two fp32 moments
CKPT_BYTES = 12  # per parameter in a checkpoint: the weight and the two moments


@dataclass(frozen=True)
class Layout:
    world: int
    ep: int = 1
    cp: int = 1

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """'w8-ep4-cp2' (ep and cp default to 1) or a bare number N (= 'wN-epN')."""
        if text.isdigit():
            return cls(int(text), int(text)).checked(text)
        vals = {}
        for part in text.split("-"):
            m = re.fullmatch(r"(w|ep|cp)(\d+)", part)
            if m is None or m.group(1) in vals:
                raise argparse.ArgumentTypeError(f"layout {text!r}: expected w<W>[-ep<E>][-cp<C>] or a number")
            vals[m.group(1)] = int(m.group(2))
        if "w" not in vals:
            raise argparse.ArgumentTypeError(f"layout {text!r}: no world size (w<W>)")
        return cls(vals["w"], vals.get("ep", 1), vals.get("cp", 1)).checked(text)

    def checked(self, text: str) -> "Layout":
        if self.world < 1 or self.ep < 1 or self.cp < 1 or self.world % self.ep or self.world % self.cp:
            raise argparse.ArgumentTypeError(f"layout {text!r}: ep ({self.ep}) and cp ({self.cp}) must divide the "
                                             f"world ({self.world})")
        return self

    @property
    def name(self) -> str:
        return f"w{self.world}" + (f"-ep{self.ep}" if self.ep > 1 else "") + (f"-cp{self.cp}" if self.cp > 1 else "")

    @property
    def dp(self) -> int:
        return self.world // self.cp


def reshard_pair(text: str) -> tuple[Layout, Layout]:
    if text.count(":") != 1:
        raise argparse.ArgumentTypeError(f"--reshard {text!r}: expected FROM:TO, e.g. 8:4 or w8-ep8:w4-ep2")
    a, b = text.split(":")
    return Layout.parse(a), Layout.parse(b)


def setting(text: str) -> tuple[str, object]:
    """'key=value' (value as JSON when it parses, else a string) -> (key, value)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected key=value")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def model_config(preset: str, layers: int, sets: dict, seq: int) -> MiMoConfig:
    """The preset with its overrides and `layers` decoder layers (0: the preset's), positions for seq tokens."""
    overrides = dict(sets)
    if layers:
        overrides["num_hidden_layers"] = layers
    c = MiMoConfig.preset(preset, **overrides)
    return c.replace(max_position_embeddings=max(c.max_position_embeddings, seq))


def parameter_split(config: MiMoConfig) -> tuple[int, int]:
    """(routed-expert parameters, all others) of the model, counted on the meta device."""
    with torch.device("meta"):
        m = MiMoForCausalLM(config)
    experts = sum(p.numel() for n, p in m.named_parameters() if ".mlp.experts." in n)
    return experts, sum(p.numel() for p in m.parameters()) - experts


def state_bytes(config: MiMoConfig, layout: Layout) -> float:
    """AdamW training state per GPU (STATE_BYTES a parameter): everything sharded over all ranks (the experts over
    ep x edp); the transient all-gathered units (a layer, one MoE layer's expert split) are not counted."""
    experts, others = parameter_split(config)
    return STATE_BYTES * (experts + others) / layout.world


# ------------------------------------------------------------------------------------------- data
def timing_rows(vocab: int, seq: int, n: int, seed: int):
    """n rows, each one document of seq random tokens (the model's plain-batch path; every position attends
    over its whole causal window, as the FLOP count assumes)."""
    from mimo_flash.training import PackedRows

    ids = torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))
    return PackedRows(ids, ids.clone(), torch.arange(seq).expand(n, seq).clone(), torch.zeros(n, seq, dtype=torch.long))


def check_rows(vocab: int, seq: int, n: int, seed: int):
    """n rows, each one document: a motif of 4..16 tokens (from the first 256 ids past the 3 special ones)
    repeated to seq tokens, so the loss falls step after step (first the few tokens, then the copying)."""
    from mimo_flash.training import PackedRows

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        motif = torch.randint(3, min(vocab, 259), (int(torch.randint(4, 17, (1,), generator=g)),), generator=g)
        rows.append(motif.repeat(-(-seq // len(motif)))[:seq])
    ids = torch.stack(rows)
    return PackedRows(ids, ids.clone(), torch.arange(seq).expand(n, seq).clone(), torch.zeros(n, seq, dtype=torch.long))


# ------------------------------------------------------------------------------------------- worker
def worker(spec_path: str) -> None:
    """One rank of one launch: spec.json -> out/rank{r}.json (results, or the error; OOM exits with status 3)."""
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    try:
        from mimo_flash.training import init_distributed

        lay = spec["layout"]
        ctx = init_distributed(ep=lay["ep"], device=spec["device"], cp=lay["cp"])
        res = run_timing(spec, ctx) if spec["mode"] == "time" else run_check(spec, ctx)
    except Exception as e:  # noqa: BLE001  recorded for the driver; the launch fails
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        write_rank_result(spec["out"], rank, {"rank": rank, "oom": oom, "error": f"{type(e).__name__}: {e}"[:2000]})
        if oom:  # the other ranks may wait in a collective for this one: torchrun stops them when it exits
            print(f"rank {rank}: out of memory: {str(e)[:300]}", flush=True)
            sys.stdout.flush()
            os._exit(3)
        traceback.print_exc()
        leave_distributed(ok=False)
        raise
    res["rank"] = rank
    write_rank_result(spec["out"], rank, res)
    end_rank()


def _train_config(spec: dict, steps: int, batch: int, **kw):
    from mimo_flash.training import TrainConfig

    return TrainConfig(steps=steps, batch_size=batch, grad_accum=spec.get("grad_accum", 1), warmup_steps=1,
                       lr=spec["lr"], bias_update_rate=1e-3, activation_checkpointing=spec["ac"], dtype=spec["dtype"],
                       seed=spec["seed"], progress=False, plot=False, **kw)


def _memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_allocated(device),
                "reserved_bytes": torch.cuda.max_memory_reserved(device),
                "device_name": torch.cuda.get_device_name(device)}
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "reserved_bytes": None,
            "device_name": "cpu"}


def _trainer(spec: dict, ctx, rows, cfg):
    from mimo_flash.distributed.materialize import SeededInit
    from mimo_flash.training import Trainer

    config = model_config(spec["preset"], spec["layers"], spec["set"], spec["seq"])
    with torch.device("meta"):
        model = MiMoForCausalLM(config)
    return Trainer(model, rows, cfg, ctx, init=SeededInit(spec["seed"]))


def run_timing(spec: dict, ctx) -> dict:
    """Build, then --warmup + --steps optimizer steps, each read back before the next (its own time)."""
    steps = spec["warmup"] + spec["steps"]
    cfg = _train_config(spec, steps, spec["batch"], shuffle=False)
    rows_per_step = cfg.batch_size * cfg.grad_accum * ctx.dp_world
    config = model_config(spec["preset"], spec["layers"], spec["set"], spec["seq"])
    rows = timing_rows(config.vocab_size, spec["seq"], rows_per_step * steps, spec["seed"])
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    t0 = time.perf_counter()
    tr = _trainer(spec, ctx, rows, cfg)
    build = time.perf_counter() - t0
    recs = [tr.train_step() for _ in range(steps)]
    times = [r["step_time"] for r in recs[spec["warmup"]:]]
    return {"build_s": build, "first_step_s": recs[0]["step_time"], "step_times": times,
            "step_s": statistics.median(times), "tokens_per_step": tr.rows_per_step * spec["seq"],
            "rows_per_step": tr.rows_per_step, "losses": [r["loss"] for r in recs], **_memory(ctx.device)}


def run_check(spec: dict, ctx) -> dict:
    """The resharding check's runs. Reference (no spec["resume"]): 2 S steps, a checkpoint at step S.
    Resumed: from the step directory spec["resume"] to step 2 S. -> the losses and gradient norms it trained."""
    S, G = spec["check_steps"], spec["global_batch"]
    if G % ctx.dp_world:
        raise ValueError(f"--check-batch {G} is not divisible by the {ctx.dp_world} data-parallel ranks")
    cfg = _train_config(spec, 2 * S, G // ctx.dp_world, shuffle=True,
                        out_dir=spec["ckpt_dir"] if not spec["resume"] else None)
    config = model_config(spec["preset"], spec["layers"], spec["set"], spec["seq"])
    rows = check_rows(config.vocab_size, spec["seq"], 4 * G * S, spec["seed"])
    tr = _trainer(spec, ctx, rows, cfg)
    recs = []
    if spec["resume"]:
        if not tr.resume(spec["resume"]):
            raise FileNotFoundError(spec["resume"])
    else:
        recs = [tr.train_step() for _ in range(S)]
        tr.save()  # the Trainer's own checkpoint: DCP shards, optimizer, data position, schedule, balance state
    recs += [tr.train_step() for _ in range(S)]
    return {"steps": [r["step"] for r in recs], "losses": [r["loss"] for r in recs],
            "grad_norms": [r["grad_norm"] for r in recs], **_memory(ctx.device)}


# ------------------------------------------------------------------------------------------- driver
def launch(args, name: str, layout: Layout, spec: dict) -> dict:
    """One torchrun launch of `layout.world` workers on `spec` in out/name/ -> {"status": ok | OOM | failed,
    "ranks": [per-rank results] (ok), "error": ... (else), "wall_s"}."""
    d = Path(args.out, name)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    spec = {"lr": args.lr, **spec, "layout": asdict(layout), "device": args.device, "preset": args.preset,
            "seed": args.seed, "ac": not args.no_ac, "out": str(d)}
    (d / "spec.json").write_text(json.dumps(spec, indent=1))
    print(f"--- {name}: {layout.world} process{'es' * (layout.world > 1)}", flush=True)
    t0 = time.perf_counter()
    rc = torchrun(SCRIPT, layout.world, ["--spec", str(d / "spec.json")], args.device, timeout=args.launch_timeout)
    ranks = read_rank_results(d)
    out = {"wall_s": time.perf_counter() - t0}
    if any(r.get("oom") for r in ranks.values()):
        return {**out, "status": "OOM", "error": next(r["error"] for r in ranks.values() if r.get("oom"))}
    errors = [r["error"] for r in ranks.values() if "error" in r]
    if rc or errors or len(ranks) != layout.world:
        why = errors[0] if errors else ("timed out" if rc == 124 else f"exit status {rc}, {len(ranks)} ranks reported")
        return {**out, "status": "failed", "error": why}
    return {**out, "status": "ok", "ranks": [ranks[r] for r in range(layout.world)]}


def time_row(args, layout: Layout, seq: int, layers: int) -> dict:
    """One (layout, seq) row: launched, then summarised (the numbers of the table and the JSON)."""
    config = model_config(args.preset, layers, args.set, seq)
    spec = {"mode": "time", "seq": seq, "layers": layers, "set": args.set, "batch": args.batch,
            "grad_accum": args.grad_accum, "steps": args.steps, "warmup": args.warmup, "dtype": args.dtype}
    res = launch(args, f"{layout.name}-s{seq}-l{config.num_hidden_layers}", layout, spec)
    experts, others = parameter_split(config)
    row = {"layout": layout.name, "world": layout.world, "ep": layout.ep, "cp": layout.cp, "seq": seq,
           "layers": config.num_hidden_layers, "params": experts + others,
           "state_gib_est": state_bytes(config, layout) / 2**30, "status": res["status"], "wall_s": res["wall_s"]}
    if res["status"] != "ok":
        return {**row, "error": res["error"]}
    ranks = res["ranks"]
    step = max(r["step_s"] for r in ranks)  # the ranks step together; the slowest one's median
    r0 = ranks[0]
    flops = model_flops(config, r0["rows_per_step"], seq, train=True, mtp_layers=config.num_nextn_predict_layers)
    reserved = [r["reserved_bytes"] for r in ranks if r["reserved_bytes"] is not None]
    return {**row, "device_name": r0["device_name"], "rows_per_step": r0["rows_per_step"],
            "tokens_per_step": r0["tokens_per_step"], "step_s": step, "step_times": r0["step_times"],
            "build_s": max(r["build_s"] for r in ranks), "first_step_s": max(r["first_step_s"] for r in ranks),
            "tokens_per_s_per_gpu": r0["tokens_per_step"] / step / layout.world, "flops_per_step": flops,
            "tflops_per_gpu": flops / step / layout.world / 1e12,
            "peak_gib": max(r["peak_bytes"] for r in ranks) / 2**30,
            "reserved_gib": max(reserved) / 2**30 if reserved else None, "losses": r0["losses"]}


def gpu_gib(args) -> float:
    """GPU memory for --fit: --gpu-gib, else nvidia-smi's total of GPU 0 (the driver starts no CUDA context)."""
    if args.gpu_gib:
        return args.gpu_gib
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0]) / 1024
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError) as e:
        raise SystemExit(f"--fit: cannot read the GPU memory from nvidia-smi ({e}); pass --gpu-gib") from e


def fit_rows(args, layout: Layout, seqs: list[int]) -> list[dict]:
    """--fit for one layout: the estimate, then one fewer layer per OOM at the longest sequence; the other
    sequences at the depth found. Each row records the depths tried."""
    budget = args.fit_fraction * gpu_gib(args) * 2**30
    most = model_config(args.preset, 0, args.set, 1).num_hidden_layers  # never deeper than the preset itself
    n = 1
    while n < most and state_bytes(model_config(args.preset, n + 1, args.set, 1), layout) <= budget:
        n += 1
    tried, longest = [], max(seqs)
    while True:
        row = time_row(args, layout, longest, n)
        tried.append(f"{n}: {row['status']}")
        if row["status"] != "OOM" or n == 1:
            break
        n -= 1
    rows = {longest: row}
    for seq in seqs:
        if seq != longest:
            rows[seq] = time_row(args, layout, seq, n) if row["status"] == "ok" else {**row, "seq": seq}
    for r in rows.values():
        r["fit"] = ", ".join(tried)
    return [rows[s] for s in seqs]


def check_dir(args, a: Layout) -> Path:
    """Where the reference run on a writes its checkpoint (its Trainer's out_dir)."""
    return Path(args.check_dir or args.out, f"check-ref-{a.name}")


def reshard_check(args, a: Layout, b: Layout, refs: dict) -> dict:
    """Reference on a (cached in refs per layout) with a checkpoint at step S; resumed on b from it."""
    S = args.check_steps
    spec = {"mode": "check", "seq": args.check_seq, "layers": args.check_layers, "set": args.check_set,
            "dtype": args.check_dtype, "check_steps": S, "global_batch": args.check_batch, "resume": None,
            "lr": args.check_lr}
    if a not in refs:
        refs[a] = launch(args, f"check-ref-{a.name}", a, {**spec, "ckpt_dir": str(check_dir(args, a))})
    ref = refs[a]
    out = {"from": a.name, "to": b.name, "steps": S, "tol": args.check_tol}
    if ref["status"] != "ok":
        return {**out, "status": f"reference {ref['status']}", "error": ref["error"], "ok": False}
    ckpt = check_dir(args, a) / "checkpoints" / f"step-{S:08d}"
    res = launch(args, f"check-{a.name}-to-{b.name}", b, {**spec, "resume": str(ckpt)})
    reference = ref["ranks"][0]["losses"]
    out.update(reference=reference, reference_grad_norms=ref["ranks"][0]["grad_norms"],
               checkpoint_files=sorted(p.name for p in ckpt.glob("*.distcp")))
    if res["status"] != "ok":
        return {**out, "status": f"resume {res['status']}", "error": res["error"], "ok": False}
    resumed = res["ranks"][0]["losses"]
    rel = max(abs(x - y) / abs(y) for x, y in zip(resumed, reference[S:], strict=True))
    return {**out, "status": "ok", "resumed": resumed, "resumed_steps": res["ranks"][0]["steps"],
            "resumed_grad_norms": res["ranks"][0]["grad_norms"], "max_rel_diff": rel, "ok": rel <= args.check_tol}


def default_layouts(n: int) -> list[Layout]:
    out = [Layout(n, n)] + ([Layout(n, n // 2)] if n % 2 == 0 and n > 1 else [])
    out += [Layout(n, n, c) for c in (2, 4) if n % c == 0 and n > 1]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--nproc", type=int, default=8, help="GPUs (or CPU processes) of this host to use at most")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--layouts", type=Layout.parse, nargs="*", default=None,
                   help="w<W>[-ep<E>][-cp<C>] or N (= wN-epN); default: see above; empty: no timing rows")
    p.add_argument("--seqs", type=int, nargs="+", default=[4096, 32768], help="tokens per row, layouts without CP")
    p.add_argument("--cp-seqs", type=int, nargs="+", default=[65536, 131072], help="tokens per row, CP layouts")
    p.add_argument("--preset", default="flash")
    p.add_argument("--set", type=setting, nargs="*", default=[], help="config overrides key=value (JSON values)")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the preset's); see --fit")
    p.add_argument("--fit", action="store_true", help="per layout, the most layers that fit (see above)")
    p.add_argument("--fit-fraction", type=float, default=0.7, help="--fit's first guess: state <= this x GPU memory")
    p.add_argument("--gpu-gib", type=float, default=0.0, help="GPU memory for --fit (default: from nvidia-smi)")
    p.add_argument("--batch", type=int, default=1, help="rows per data-parallel rank per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bf16 autocast on GPUs (fp32 master weights), fp32 on CPUs")
    p.add_argument("--no-ac", action="store_true", help="no activation checkpointing")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reshard", type=reshard_pair, nargs="*", default=[], help="FROM:TO layout pairs")
    p.add_argument("--check-steps", type=int, default=4, help="S: steps before the checkpoint and after it")
    p.add_argument("--check-seq", type=int, default=4096)
    p.add_argument("--check-batch", type=int, default=0, help="rows per step (0: the lcm of the data-parallel sizes)")
    p.add_argument("--check-layers", type=int, default=2)
    p.add_argument("--check-set", type=setting, nargs="*", default=[], help="config overrides for the check")
    p.add_argument("--check-dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--check-lr", type=float, default=1e-3)
    p.add_argument("--check-tol", type=float, default=1e-3, help="max relative loss difference to the reference")
    p.add_argument("--check-dir", default=None, help="where the check's checkpoints go (default: under --out)")
    p.add_argument("--launch-timeout", type=float, default=1800, help="seconds before a launch is killed")
    p.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write every row and check here as JSON")
    args = p.parse_args()
    if args.worker:
        worker(args.spec)
        return
    args.set, args.check_set = dict(args.set), dict(args.check_set)
    layouts = default_layouts(args.nproc) if args.layouts is None else args.layouts
    for lay in layouts + [x for pair in args.reshard for x in pair]:
        if lay.world > args.nproc:
            p.error(f"layout {lay.name} needs {lay.world} processes; --nproc is {args.nproc}")
    if args.fit and args.layers:
        p.error("--fit chooses the layers: drop --layers")
    if args.reshard and not args.check_batch:
        args.check_batch = math.lcm(*(x.dp for pair in args.reshard for x in pair))
    if args.device == "cuda":  # the workers' allocator: less fragmentation at the edge of the memory
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args.out = args.out or tempfile.mkdtemp(prefix="train-full-")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    rows = []
    for lay in layouts:
        seqs = args.cp_seqs if lay.cp > 1 else args.seqs
        if args.fit:
            rows += fit_rows(args, lay, seqs)
        else:
            rows += [time_row(args, lay, s, args.layers) for s in seqs]
    refs, checks = {}, []
    for i, (a, b) in enumerate(args.reshard):
        checks.append(reshard_check(args, a, b, refs))
        if all(a != later for later, _ in args.reshard[i + 1:]):  # ~12 bytes a parameter: gone once read
            shutil.rmtree(check_dir(args, a) / "checkpoints", ignore_errors=True)

    dev = next((r["device_name"] for r in rows if "device_name" in r), args.device)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"device: {dev} x{args.nproc}; date: {date}; torch {torch.__version__}; "
            f"command: python {' '.join(sys.argv)}; {time.perf_counter() - t_start:.0f} s in all")
    if rows:
        print_rows(args, rows, head)
    for c in checks:
        print_check(args, c, head)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": head, "rows": rows, "checks": checks}, indent=1))
    failed = [r for r in rows if r["status"] == "failed"] + [c for c in checks if not c["ok"]]
    if failed:
        raise SystemExit(f"{len(failed)} row(s) or check(s) failed; see above")


def print_rows(args, rows: list[dict], head: str) -> None:
    out = []
    for r in rows:
        cells = [r["layout"], r["world"], r["ep"], r["cp"], r["layers"], fmt(r["params"] / 1e9, ".2f"), r["seq"],
                 fmt(r["state_gib_est"], ".1f")]
        if r["status"] != "ok":
            out.append(cells + [r["status"], "", "", "", "", "", "", ""])
            continue
        out.append(cells + [r["rows_per_step"], fmt(r["step_s"], ".3f"), fmt(r["tokens_per_s_per_gpu"], ",.0f"),
                            fmt(r["tflops_per_gpu"], ".1f"), fmt(r["peak_gib"], ".1f"), fmt(r["reserved_gib"], ".1f"),
                            f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}", fmt(r["build_s"], ".0f")])
    notes = [f"{args.preset} preset{' with ' + json.dumps(args.set) if args.set else ''}, MTP on, "
             f"{'activation checkpointing' if not args.no_ac else 'no activation checkpointing'}, dtype {args.dtype} "
             "(auto: bf16 autocast with fp32 master weights on GPUs), AdamW; model built on meta, each rank fills "
             f"its shards (SeededInit); {args.batch} row(s) of one document per data-parallel rank per micro-batch, "
             f"{args.grad_accum} micro-batch(es) a step; median of {args.steps} steps after {args.warmup}",
             "layout w<W>-ep<E>-cp<C>: FSDP2 over W ranks, routed experts over E (each split FSDP2 over W / E), each "
             "row over C",
             "state GiB: AdamW training state per GPU, 16 bytes a parameter / W",
             "TFLOP/s per GPU: model_flops (bench/common.py) / step time / W: per decoder layer 3 x 2*N*(QKV and O "
             "projections + router + top-k experts' SwiGLU, or the dense MLP) + 3.5 x 2*B*H*pairs*(Dqk + Dv) with "
             "pairs = sum_i min(i + 1, W_swa) on sliding-window layers (W_swa = sliding_window) and T(T+1)/2 on "
             "global ones; lm_head 3 x 2*N*D*V; each MTP layer its eh_proj, SWA attention, dense MLP and lm_head; "
             "activation recomputation, elementwise work and the optimizer not counted",
             "peak GiB: max over ranks of torch.cuda.max_memory_allocated (CPU: peak RSS); reserved: "
             "max_memory_reserved (PYTORCH_CUDA_ALLOC_CONF=" + os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + ")",
             "build s: the model built on meta, sharded and filled on every rank (before the first step)"]
    if any("fit" in r for r in rows):
        notes.append("--fit, layers tried per layout at its longest sequence: "
                     + "; ".join(sorted({f"{r['layout']} ({r['fit']})" for r in rows if 'fit' in r})))
    notes += [f"{r['layout']} seq {r['seq']}: {r['error'][:300]}" for r in rows if r["status"] == "failed"]
    table("Training at the flash dimensions, one host" if args.preset == "flash" else f"Training, {args.preset} preset",
          head, ["layout", "GPUs", "EP", "CP", "layers", "params B", "tokens/row", "state GiB", "rows/step", "s/step",
                 "tokens/s/GPU", "TFLOP/s/GPU", "peak GiB", "reserved GiB", "loss", "build s"], out, notes)


def print_check(args, c: dict, head: str) -> None:
    title = f"Resharding check: checkpoint on {c['from']} at step {c['steps']}, resumed on {c['to']}"
    if c["status"] != "ok":
        table(title, head, ["status", "error"], [[c["status"], c["error"][:300]]])
        return
    S, rows = c["steps"], []
    for i, ref in enumerate(c["reference"]):
        got = c["resumed"][i - S] if i >= S else None
        rows.append([i + 1, f"{ref:.6f}", "(before the checkpoint)" if got is None else f"{got:.6f}",
                     "" if got is None else f"{abs(got - ref) / abs(ref):.1e}"])
    table(title, head, ["step", f"reference on {c['from']} (never stopped)", f"resumed on {c['to']}", "rel diff"],
          rows, [f"{args.check_layers} layers of the {args.preset} preset"
                 f"{' with ' + json.dumps(args.check_set) if args.check_set else ''}, {args.check_dtype}, "
                 f"{args.check_batch} rows of {args.check_seq} tokens a step (repeated motifs), lr {args.check_lr}; "
                 f"checkpoint files: {', '.join(c['checkpoint_files'])}",
                 f"max relative difference {c['max_rel_diff']:.1e}, tolerance {c['tol']:.0e}: "
                 + ("PASS" if c["ok"] else "FAIL")])


if __name__ == "__main__":
    main()
