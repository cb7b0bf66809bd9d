"""MTP speculative decoding with weights that accept: train, then measure acceptance and speed-up.

    python bench/spec.py                                   # GPU: mini preset, 3 minutes of training (~6 min in all)
    python bench/spec.py --device cpu --train-minutes 0.2  # CPU: tiny preset, small sizes (checks that it works)
    python bench/spec.py --out RUN; python bench/spec.py --reuse RUN --option decode_experts=\"triton\"
                                                           # the same trained model, decoded with another option
    python bench/spec.py --batches 16 --ks auto            # plain and adaptive K only
    python bench/spec.py --reuse RUN --batches 64 --ks 1 --profile  # also where each setting's time goes

1. Corpus (offline, no download): the Python standard library's sources under this interpreter's lib directory
   and pydoc_data's topics. Source files whose path hashes to 0 mod 10 are held out: the prompts come from them.
2. A byte-level BPE (--vocab tokens) trained on the training text; the preset (its vocabulary replaced) trained
   with its MTP loss by the project's Trainer (bf16 autocast on CUDA) for --train-minutes of wall time after its first three steps (the LR
   schedule's length is set from the speed of the first steps).
3. Decoding of held-out prompts (--prompt-len tokens, --new-tokens new, no EOS) at each batch size, greedy and
   sampled (temperature 0.8), plain (K=0), K = 1, 2, 3 and adaptive ("auto"; its controller is kept from the
   warm-up call to the timed one). On CUDA the graphed steps are compiled (generate(compile=True), as
   bench/decode.py times them). Every setting runs to warm up (compile, graph capture) until a call captures
   nothing new (at most three calls), then --repeats times timed: its row is the call of median decode time.
   speed-up = plain decode time / this decode time (the same tokens: no EOS); e2e includes the prefill.
   Batch 1 greedy: the step's time against its byte floor (weights and cache it must read, the experts of all
   k+1 verified tokens counted, and the k MTP layers with their lm_head reads) at the measured copy bandwidth.
Everything is seeded (--seed): the command alone reproduces the recipe (timings and the number of training
steps depend on the machine).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import sysconfig
import tempfile
import time
import zlib
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import copy_bandwidth, header, table  # noqa: E402

from mimo_flash import MiMoConfig, MiMoForCausalLM  # noqa: E402
from mimo_flash.generation import generate  # noqa: E402
from mimo_flash.generation.adaptive import AdaptiveK  # noqa: E402
from mimo_flash.generation.runner import kv_bucket  # noqa: E402
from mimo_flash.model.moe import MoE  # noqa: E402

T0 = time.perf_counter()
DEFAULTS = {  # per device: what fits the GPU run's ~6 minutes, and a CPU check of a minute or two
    "cuda": dict(preset="mini", vocab=8192, corpus_mb=8.0, seq_len=512, batch_size=32, lr=1e-3, batches=[1, 16, 64],
                 prompt_len=256, new_tokens=128),
    "cpu": dict(preset="tiny", vocab=1024, corpus_mb=0.6, seq_len=128, batch_size=8, lr=3e-3, batches=[1, 4],
                prompt_len=48, new_tokens=24),
}
TEMPERATURE = 0.8


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


# ------------------------------------------------------------------------------------------ data
def corpus(seed: int, max_mb: float) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): stdlib sources (shuffled with `seed`, up to max_mb of training text)
    plus pydoc topics for training; held out: sources whose relative path's crc32 is 0 mod 10."""
    from pydoc_data.topics import topics

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise SystemExit(f"no Python sources under {root}: the corpus needs the standard library's sources")
    train, held = [], []
    for p in files:
        rel = str(p.relative_to(root))
        (held if zlib.crc32(rel.encode()) % 10 == 0 else train).append(p)
    random.Random(seed).shuffle(train)
    texts, size = [topics[k].strip() for k in sorted(topics)], 0
    size = sum(len(t) for t in texts)
    for p in train:
        if size >= max_mb * 1e6:
            break
        t = p.read_text(encoding="utf-8", errors="replace")
        texts.append(t)
        size += len(t)
    return texts, [p.read_text(encoding="utf-8", errors="replace") for p in held]


def prompts(tok, held: list[str], n: int, length: int) -> torch.Tensor:
    """[n, length] prompts: consecutive windows of the held-out files' tokens, in file order."""
    rows = []
    for text in held:
        ids = tok.encode(text)
        for s in range(0, len(ids) - length + 1, length):
            rows.append(ids[s:s + length])
            if len(rows) == n:
                return torch.tensor(rows)
    raise SystemExit(f"the held-out files give {len(rows)} prompts of {length} tokens, {n} wanted")


# ------------------------------------------------------------------------------------------ training
def train(args, texts, out: Path):
    from mimo_flash.training.data import Document, pack_documents
    from mimo_flash.training.demo import train_tokenizer
    from mimo_flash.distributed.context import ParallelContext
    from mimo_flash.training import TrainConfig, Trainer

    tok = train_tokenizer(texts, args.vocab, out / "tokenizer")
    docs = [Document(tok.encode(t) + [tok.eos_id]) for t in texts]
    rows = pack_documents(docs, args.seq_len, tok.pad_id)
    n_tokens = sum(len(d.ids) for d in docs)
    log(f"corpus: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} MB -> {n_tokens:,} tokens "
        f"({tok.vocab_size}-token BPE), {len(rows)} rows of {args.seq_len}")
    torch.manual_seed(args.seed)
    config = MiMoConfig.preset(args.preset, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=None,
                               pad_token_id=tok.pad_id, torch_dtype="bfloat16" if args.device == "cuda" else "float32")
    model = MiMoForCausalLM(config)
    budget = args.train_minutes * 60
    est = 10 ** 6  # the schedule's length until the first steps are timed
    tc = TrainConfig(steps=est, batch_size=args.batch_size, lr=args.lr, warmup_steps=20, min_lr_ratio=0.1,
                     bias_update_rate=1e-3, out_dir=None, progress=False, plot=False, seed=args.seed)
    trainer = Trainer(model, rows, tc, ParallelContext(device=torch.device(args.device)), tokenizer=tok)
    schedule = trainer.scheduler.lr_lambdas[0]  # WarmupCosine: its total is set once the speed is known
    # the first steps compile (and on CUDA tune) the training step: they run before the budget's clock starts,
    # each timed, so that a slow compilation shows as such instead of eating the budget
    hist, warm = [], []
    for _ in range(3):
        t = time.perf_counter()
        hist.append(trainer.train_step())
        warm.append(time.perf_counter() - t)
    log("first steps (compilation; outside the budget): " + " / ".join(f"{w:.1f}" for w in warm) + " s")
    t0 = time.perf_counter()
    per, shown = None, t0
    while time.perf_counter() - t0 < budget:
        hist.append(trainer.train_step())
        if not (math.isfinite(hist[-1]["loss"]) and math.isfinite(hist[-1]["grad_norm"])):
            raise SystemExit(f"training diverged at step {len(hist)}: loss {hist[-1]['loss']}, gradient norm "
                             f"{hist[-1]['grad_norm']} (the steps before: " + ", ".join(
                                 f"{r['loss']:.3f} / {r['grad_norm']:.3g}" for r in hist[-6:-1]) + ")")
        if per is None and len(hist) == 8:  # steps 4..8 set the schedule's length from their speed
            per = (time.perf_counter() - t0) / 5
            schedule.total = max(len(hist) + 1, int(len(hist) + (budget - (time.perf_counter() - t0)) / per))
            schedule.warmup = min(schedule.warmup, max(1, schedule.total // 10))
            log(f"{per * 1e3:.0f} ms a step: {schedule.total} steps in the budget")
        if time.perf_counter() - shown > 30:
            shown = time.perf_counter()
            log(f"step {len(hist)}: loss {hist[-1]['loss']:.3f}, gradient norm {hist[-1]['grad_norm']:.3g}")
    train_s = time.perf_counter() - t0
    tail = hist[-max(1, len(hist) // 10):]
    mtp = [r.get("mtp_loss", float("nan")) for r in hist]
    log(f"trained {len(hist)} steps ({trainer.tokens_seen:,} tokens) in {train_s:.0f} s + {sum(warm):.0f} s: loss "
        f"{hist[0]['loss']:.3f} -> {statistics.mean(r['loss'] for r in tail):.3f}, MTP CE "
        f"{mtp[0]:.3f} -> {statistics.mean(mtp[-len(tail):]):.3f}")
    trainer.export(out / "checkpoint")
    trained = dict(steps=len(hist), tokens=trainer.tokens_seen, seconds=train_s)
    (out / "trained.json").write_text(json.dumps(trained))
    return load_trained(args, out)


def load_trained(args, out: Path):
    """(tokenizer, model, training figures) of a run's --out directory (this run's, or --reuse's)."""
    from mimo_flash.tokenizer import Tokenizer

    if not (out / "trained.json").exists():
        raise SystemExit(f"{out} holds no trained run of bench/spec.py (no trained.json)")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = MiMoForCausalLM.from_pretrained(out / "checkpoint", dtype=dtype, device=torch.device(args.device)).eval()
    return Tokenizer.from_pretrained(out / "tokenizer"), model, json.loads((out / "trained.json").read_text())


# ------------------------------------------------------------------------------------------ bytes
def _nbytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())


def step_floor_bytes(model, S: int, kv_len: int, k: int) -> int:
    """Bytes a batch-1 step with k drafts must read: the main model over k + 1 tokens (every weight once, the
    experts of all k + 1 tokens: min(E, (k + 1) * top-k) per MoE layer, the cache once) and k MTP layers (their
    weights, lm_head and ring each; re-run columns read nothing more)."""
    c = model.config
    isz = model.dtype.itemsize
    total = (k + 1) * c.hidden_size * isz + _nbytes(model.model.norm) + _nbytes(model.lm_head)
    for layer in model.model.layers:
        total += _nbytes(layer)
        if isinstance(layer.mlp, MoE):
            ex = layer.mlp.experts
            per_expert = (ex.gate_up_proj[0].numel() + ex.down_proj[0].numel()) * ex.gate_up_proj.element_size()
            total -= _nbytes(ex)
            total += min(c.n_routed_experts, (k + 1) * c.num_experts_per_tok) * per_expert
    bucket = kv_bucket(kv_len, S)
    ring = c.sliding_window + 2 * k
    for i in range(c.num_hidden_layers):
        d = c.attn_dims(c.is_swa(i))
        total += (ring if c.is_swa(i) else bucket) * d["kv_heads"] * (d["qk_dim"] + d["v_dim"]) * isz
    d = c.attn_dims(True)
    for j in range(k):
        total += _nbytes(model.model.mtp.layers[j]) + _nbytes(model.lm_head)
        total += ring * d["kv_heads"] * (d["qk_dim"] + d["v_dim"]) * isz
    return total


# ------------------------------------------------------------------------------------------ decoding
def run(model, ids, new: int, K, sample: bool, seed: int, adaptive=None, compile: bool | None = None):
    """One timed generate call (after the caller's warm-up) -> (tokens [B, new], stats, wall seconds).
    compile (default: on CUDA) the graphed steps as bench/decode.py times them; False: graphs of eager code."""
    kw = dict(max_new_tokens=new, eos_token_id=[], num_speculative_tokens=K, seed=seed, return_stats=True,
              compile=ids.is_cuda if compile is None else compile)
    if sample:
        kw.update(do_sample=True, temperature=TEMPERATURE)
    if adaptive is not None:
        kw["adaptive"] = adaptive
    if ids.is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    out, stats = generate(model, ids, **kw)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return out[:, ids.shape[1]:], stats, time.perf_counter() - t


def profile_call(model, ids, new: int, K, sample: bool, seed: int, adaptive, path: Path) -> str:
    """Two more calls under torch.profiler (after the timed ones), of 2 and of `new` tokens: their difference is the
    decode's steps after the first (the prefill, the MTP layers' pass over the prompt and the first step drop out).
    Returns a line with its device busy time (kernels', copies' and sets' durations summed) against its wall time,
    per step; on the CPU: n/a. Writes to `path` the same difference by name, per step: each kernel's launches and
    time (CPU: each op's own CPU time), largest first. The profiler slows the host, so these calls' times are not
    the row's. The 2-token call runs once before, unprofiled: what it captures or compiles (graphs of chunk lengths
    the timed calls did not use) would otherwise count against the difference."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = ids.is_cuda
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    res = []
    run(model, ids, 2, K, sample, seed, adaptive)  # its graphs (chunks of other lengths) captured outside the profile
    for n in (2, new):
        with profile(activities=acts) as prof:
            _, st, wall = run(model, ids, n, K, sample, seed, adaptive)
        by_name = defaultdict(lambda: [0, 0.0])  # name -> [launches, us]
        for e in prof.events():
            if cuda and e.device_type == DeviceType.CUDA:
                us = e.time_range.elapsed_us()
            elif not cuda and e.device_type == DeviceType.CPU:
                us = e.self_cpu_time_total
            else:
                continue
            by_name[e.name][0] += 1
            by_name[e.name][1] += us
        res.append((1e3 * wall, st.steps, by_name))
    (w1, s1, t1), (w, s, t) = res
    steps = max(1, s - s1)
    rows = sorted(((n, (c - t1.get(n, (0, 0))[0]) / steps, (us - t1.get(n, (0, 0))[1]) / steps)
                   for n, (c, us) in t.items()), key=lambda r: -r[2])
    busy = sum(r[2] for r in rows) * steps / 1e3  # ms
    unit = "device" if cuda else "CPU (self)"
    lines = [f"{steps} steps (a call of {new} tokens less one of 2); per step: launches, {unit} us, name",
             f"{sum(r[1] for r in rows):8.2f} {sum(r[2] for r in rows):9.1f}  (all)"]
    lines += [f"{c:8.2f} {us:9.1f}  {name[:160]}" for name, c, us in rows if abs(us) >= 0.05 or abs(c) >= 0.01]
    path.write_text("\n".join(lines) + "\n")
    device = (f"device busy {busy:.2f} ms ({busy / steps:.3f} ms a step), idle {(w - w1) - busy:.2f} ms" if cuda
              else "device time n/a (no CUDA)")
    return (f"decode {1e3 * st.decode_seconds:.2f} ms over {st.steps} steps; under the profiler, the call less a "
            f"2-token call: wall {w - w1:.2f} ms over {steps} steps ({(w - w1) / steps:.3f} ms a step), {device}; "
            f"by kernel: {path}")


def agreement(toks: torch.Tensor, ref: torch.Tensor) -> tuple[str, str]:
    """(share of rows equal to ref, mean count of leading tokens equal to ref's) as table cells. In bf16 a step
    that rounds differently (other kernels, more tokens per row) flips a trained model's near-ties."""
    eq = toks == ref
    return f"{eq.all(1).float().mean().item():.2f}", f"{eq.long().cumprod(1).sum(1).float().mean().item():.0f}"


def measure(model, all_prompts, args, bandwidth, skipped: list, fallbacks: set) -> list[list]:
    """One row per (batch, mode, K); K = 0 (plain) first: the base of the speed-ups. Greedy and sampled share
    each K's runner (its graphs), so the loop runs K outside the mode. Settings that would start after
    --budget-minutes are skipped (listed in `skipped`); what the runners fell back from (a graph, a kernel that
    failed: their notes) goes into `fallbacks`."""
    rows = []
    k_max = min(3, model.config.num_nextn_predict_layers)
    settings = [0] + [k for k in (1, 2, 3) if k <= k_max and (args.ks is None or str(k) in args.ks)] \
        + (["auto"] if args.ks is None or "auto" in args.ks else [])
    for B in args.batches:
        ids = all_prompts[:B].to(args.device)
        S_est = -(-(args.prompt_len + args.new_tokens + 2 * k_max + 2) // 64) * 64
        base, table_rows = {}, {False: [], True: []}
        for K in settings:
            if time.perf_counter() - T0 > 60 * args.budget_minutes:
                skipped.append(f"batch {B} K={K}")
                continue
            ctl = {False: AdaptiveK(k_max), True: AdaptiveK(k_max)} if K == "auto" else {False: None, True: None}
            kk = k_max if K == "auto" else K
            for sample in (False, True):
                # warm-up: compiles and captures graphs, until a call needs no new ones (auto's controller, kept
                # from call to call, may choose differently in the next call)
                built = run(model, ids, args.new_tokens, kk, sample, args.seed, ctl[sample])[1].capture_seconds
                for _ in range(2):
                    again = run(model, ids, args.new_tokens, kk, sample, args.seed, ctl[sample])[1].capture_seconds
                    if again == built:
                        break
                    built = again
                timed = []
                for _ in range(args.repeats):
                    timed.append(run(model, ids, args.new_tokens, kk, sample, args.seed, ctl[sample]))
                    if timed[-1][1].capture_seconds != built:
                        log(f"batch {B} K={K} {'sampled' if sample else 'greedy'}: a timed call captured graphs "
                            f"({timed[-1][1].capture_seconds - built:.2f} s)")
                        built = timed[-1][1].capture_seconds
                for n in sorted({n for r in timed for n in r[1].notes} - fallbacks):
                    log(f"batch {B} K={K} {'sampled' if sample else 'greedy'}: the runner fell back: {n}")
                    fallbacks.add(n)
                # the run of median decode time (its tokens, acceptance and wall time: one call's figures together)
                toks, st, wall = sorted(timed, key=lambda r: r[1].decode_seconds)[len(timed) // 2]
                if K == 0:
                    base[sample] = (toks, st, wall)
                b = base[sample]
                same, lead = ("", "") if sample else agreement(toks, b[0])
                step_ms = 1e3 * st.decode_seconds / max(1, st.steps)
                floor = ""
                if B == 1 and not sample and K != "auto" and bandwidth:
                    fb = step_floor_bytes(model, S_est, args.prompt_len + args.new_tokens, K)
                    floor = f"{1e3 * fb / bandwidth:.3f} ({step_ms / (1e3 * fb / bandwidth):.2f}x)"
                mean_k, busy = "", ""
                if K:  # rows a verification step still emitted for, as a share of the batch (the rest wait)
                    vsteps = sum(1 for k in st.spec_k if k) if st.spec_k else st.steps
                    busy = f"{st.row_steps / (B * vsteps):.2f}" if vsteps else ""
                if K == "auto":
                    c = ctl[sample]
                    mean_k = f"{statistics.mean(st.spec_k):.2f}" if st.spec_k else "0"
                    log(f"auto, batch {B}, {'sampled' if sample else 'greedy'}: k per step {st.spec_k}; rates "
                        f"{[round(a, 2) for a in c.alpha]}; ms per step for k = 0..{k_max}: "
                        f"{[None if c.cost(k) is None else round(1e3 * c.cost(k), 3) for k in range(k_max + 1)]}")
                row = [B, "sampled" if sample else "greedy", K, f"{st.acceptance_length:.2f}" if K else "1.00", busy,
                       mean_k, f"{st.new_tokens / st.decode_seconds:,.0f}", f"{step_ms:.3f}", floor,
                       f"{b[1].decode_seconds / st.decode_seconds:.2f}x", f"{b[2] / wall:.2f}x", same, lead]
                table_rows[sample].append(row)
                if args.profile:
                    name = f"profile_b{B}_{'sampled' if sample else 'greedy'}_k{K}.txt"
                    log(f"batch {B} K={K} {'sampled' if sample else 'greedy'}, profiled: " + profile_call(
                        model, ids, args.new_tokens, kk, sample, args.seed, ctl[sample], args.out_dir / name))
                log(" | ".join(str(x) for x in row) + f"  (prefill {1e3 * st.prefill_seconds:.2f} ms, decode "
                    f"{1e3 * st.decode_seconds:.2f} ms, wall {1e3 * wall:.2f} ms; timed walls "
                    f"{[round(1e3 * r[2], 2) for r in timed]} ms)")
                if K == 0 and not sample and not args.no_eager:
                    # rounding's share of "same": plain greedy again through other kernels (graphs of eager code)
                    run(model, ids, args.new_tokens, 0, False, args.seed, compile=False)
                    toks, st, wall = run(model, ids, args.new_tokens, 0, False, args.seed, compile=False)
                    row = [B, "greedy", "0 eager", "1.00", "", "", f"{st.new_tokens / st.decode_seconds:,.0f}",
                           f"{1e3 * st.decode_seconds / max(1, st.steps):.3f}", "",
                           f"{b[1].decode_seconds / st.decode_seconds:.2f}x", f"{b[2] / wall:.2f}x",
                           *agreement(toks, b[0])]
                    table_rows[False].append(row)
                    log(" | ".join(str(x) for x in row))
        rows += table_rows[False] + table_rows[True]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--train-minutes", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    for name in ("preset", "vocab", "corpus_mb", "seq_len", "batch_size", "lr", "prompt_len", "new_tokens"):
        p.add_argument("--" + name.replace("_", "-"), type=type(DEFAULTS["cuda"][name]), default=None,
                       help="default: per device (%s)" % ", ".join(f"{d}: {v[name]}" for d, v in DEFAULTS.items()))
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 16 64 on cuda, 1 4 on cpu")
    p.add_argument("--ks", nargs="+", default=None, choices=["1", "2", "3", "auto"],
                   help="the speculative settings to measure (default: all; plain decoding, K = 0, always runs)")
    p.add_argument("--budget-minutes", type=float, default=5.5,
                   help="no new setting starts after this much wall time (the table says which were skipped)")
    p.add_argument("--out", default=None, help="where the tokenizer and checkpoint go (default: a temp dir)")
    p.add_argument("--reuse", default=None, metavar="DIR",
                   help="measure the model an earlier run trained into its --out DIR (no training)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed calls per setting after its warm-up; the row is the one of median decode time")
    p.add_argument("--no-eager", action="store_true",
                   help="skip the K = 0 eager row (plain greedy through graphs of eager code: the rounding baseline "
                        "of same and lead)")
    p.add_argument("--profile", action="store_true",
                   help="after each setting's timed calls, two more under torch.profiler: the decode's device busy "
                        "and idle time in the log, its kernels per step by name in --out (or a temp dir) as "
                        "profile_b<B>_<mode>_k<K>.txt")
    p.add_argument("--option", action="append", default=[], metavar="NAME=JSON",
                   help="set options().NAME for the decoding (e.g. decode_experts=\"triton\"); repeatable")
    args = p.parse_args(argv)
    if args.option:
        from mimo_flash.options import set_options
        try:
            set_options(**{k: json.loads(v) for k, _, v in (o.partition("=") for o in args.option)})
        except (ValueError, TypeError) as e:
            p.error(f"--option: {e}")
    for name, v in DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, v)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu)")
    if args.train_minutes <= 0:
        raise SystemExit("--train-minutes must be > 0")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    print(header(), flush=True)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mimo-spec-"))
    out.mkdir(parents=True, exist_ok=True)
    args.out_dir = out
    texts, held = corpus(args.seed, args.corpus_mb)
    tok, model, trained = load_trained(args, Path(args.reuse)) if args.reuse else train(args, texts, out)
    all_prompts = prompts(tok, held, max(args.batches), args.prompt_len)
    bandwidth = copy_bandwidth() if args.device == "cuda" else None
    skipped: list[str] = []
    fallbacks: set[str] = set()
    rows = measure(model, all_prompts, args, bandwidth, skipped, fallbacks)
    c = model.config
    notes = [f"{args.preset} preset (vocab {c.vocab_size}), trained {trained['steps']} steps / "
             f"{trained['tokens']:,} tokens in {trained['seconds']:.0f}s; prompts {args.prompt_len} tokens of held-out "
             f"stdlib sources, {args.new_tokens} new tokens, no EOS; sampled: temperature {TEMPERATURE}",
             "acc len: tokens per verification step per row; busy: rows a verification step still emitted for, as a "
             "share of the batch (a batch runs until its last row is done: speed-up = acc len x busy / step's cost "
             "in plain steps); mean k: adaptive's drafts per step (0 = plain step); "
             "speed-up: plain decode time / this one; e2e: with prefill; same: rows equal to plain greedy; lead: "
             "mean count of leading new tokens equal to plain greedy's; K = 0 eager: plain greedy through graphs of eager "
             "code instead of compiled steps (on the CPU the same steps): the rounding baseline of same and lead",
             "floor (batch 1 greedy): bytes the step must read / copy bandwidth "
             + (f"({bandwidth / 1e12:.2f} TB/s)" if bandwidth else "(n/a off CUDA)") + ", and step / floor",
             (f"options: {', '.join(args.option)}; " if args.option else "")
             + (f"model trained by an earlier run ({args.reuse}); " if args.reuse else "")
             + f"total wall time {time.perf_counter() - T0:.0f}s"
             + (f"; skipped (past --budget-minutes {args.budget_minutes}): {', '.join(skipped)}" if skipped else ""),
             "runner fallbacks: " + ("; ".join(sorted(fallbacks)) if fallbacks else "none")]
    table("MTP speculative decoding, trained weights", header(),
                ["batch", "mode", "K", "acc len", "busy", "mean k", "tok/s", "step ms", "floor ms (x)", "speed-up",
                 "e2e", "same", "lead"], rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
