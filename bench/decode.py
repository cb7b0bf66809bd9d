"""Decode speed: mimo-flash vs transformers generate, same random weights, one run on one GPU.

    python bench/decode.py                       # mini preset, batch 1 and 64, prompt 512, 256 new tokens
    python bench/decode.py --batch 1 --spec 0 3  # subsets
    python bench/decode.py --cache-report        # KV-cache bytes per sequence (flash preset), no GPU needed
    python bench/decode.py --batch 16 64 --spec 0 1 3 --experts dense triton --no-transformers
                                                 # the batched decode's expert paths side by side
    python bench/decode.py --preset flash --layers 4 --fp8 --batch 1 16 64 --spec 0 1 2 3 --no-transformers
                                                 # the released dimensions cut to 4 layers (+ the 3 MTP layers)

mimo-flash decodes through CUDA graphs of torch.compile'd steps (static KV cache, ring buffers for SWA
layers); transformers runs its default generate (eager attention, DynamicCache). Random weights: greedy
tokens are arbitrary, and speculative acceptance is low because the MTP layers are untrained.
Batch-1 bandwidth = bytes of weights and cache that one decode step reads (the chosen experts only) /
step time, against a measured device-to-device copy (bytes read + written).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import copy_bandwidth, random_model  # noqa: E402
from mimo_flash import MiMoConfig  # noqa: E402
from mimo_flash.generation import format_bytes_report, generate  # noqa: E402
from mimo_flash.generation.runner import kv_bucket  # noqa: E402
from mimo_flash.model.moe import MoE  # noqa: E402
from mimo_flash.ops.moe import DECODE_EXPERTS  # noqa: E402

T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def step_bytes(model, B: int, S: int, kv_len: int, K: int = 0, spec: bool = False) -> int:
    """Bytes one decode step must read: the weights it touches + the cache. Plain (spec=False): one token per
    row, top-k of E experts per token. A speculative step with K drafts (spec=True): the verification's K + 1
    tokens per row, the experts of all of them counted (up to E), and K MTP layers (each with lm_head and its
    ring); its byte floor."""
    c = model.config
    T = K + 1 if spec else 1
    total = B * T * c.hidden_size * model.dtype.itemsize  # embedding rows
    for layer in model.model.layers:
        for name, p in layer.named_parameters():
            if ".experts." in name:
                continue
            total += p.numel() * p.element_size()
        if isinstance(layer.mlp, MoE):
            ex = layer.mlp.experts
            per_expert = (ex.gate_up_proj[0].numel() + ex.down_proj[0].numel()) * ex.gate_up_proj.element_size()
            total += min(c.n_routed_experts, B * T * c.num_experts_per_tok) * per_expert
        total += sum(b.numel() * b.element_size() for b in layer.buffers())
    total += model.model.norm.weight.numel() * model.model.norm.weight.element_size()
    total += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    bucket = kv_bucket(kv_len, S)
    R = c.sliding_window + 2 * K
    for i in range(c.num_hidden_layers):
        d = c.attn_dims(c.is_swa(i))
        n = R if c.is_swa(i) else bucket
        total += B * n * d["kv_heads"] * (d["qk_dim"] + d["v_dim"]) * model.dtype.itemsize
    if spec:
        d = c.attn_dims(True)
        for layer in model.model.mtp.layers[:K]:
            total += sum(p.numel() * p.element_size() for p in layer.parameters())
            total += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
            total += B * R * d["kv_heads"] * (d["qk_dim"] + d["v_dim"]) * model.dtype.itemsize
    return total


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ours(model, ids, new, K, compile):
    kw = dict(max_new_tokens=new, num_speculative_tokens=K, compile=compile, eos_token_id=[])
    t = time.perf_counter()
    out, st = generate(model, ids, return_stats=True, **kw)  # first call: compile + capture
    first = time.perf_counter() - t
    sync()
    t = time.perf_counter()
    out, st = generate(model, ids, return_stats=True, **kw)
    sync()
    total = time.perf_counter() - t
    B = ids.shape[0]
    return dict(total_s=total, prefill_s=st.prefill_seconds, decode_s=st.decode_seconds,
                decode_tok_s=B * (new - 1) / st.decode_seconds, e2e_tok_s=B * new / total,
                first_call_s=first, steps=st.steps, acceptance_length=st.acceptance_length,
                acceptance_rate=st.acceptance_rate, tokens=out)


def time_transformers(tf, ids, new):
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    tf.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    sync()
    t = time.perf_counter()
    tf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    sync()
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    out = tf.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
    sync()
    total = time.perf_counter() - t
    B = ids.shape[0]
    return dict(total_s=total, prefill_s=prefill, decode_s=total - prefill,
                decode_tok_s=B * (new - 1) / (total - prefill), e2e_tok_s=B * new / total, tokens=out)


def replay_us(g, n: int = 50) -> float:
    """Microseconds per replay of CUDA graph g (after 3 warm-up replays)."""
    for _ in range(3):
        g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n * 1e3


def graph_report(model, B: int, tag: str = "") -> str:
    """Replay time of each captured decode graph of batch B, and the kernels of the plain decode step and the
    speculative steps (their tables also written to $OUT, named by batch, step and tag)."""
    from mimo_flash.generation.engine import _RUNNERS

    lines, tabled = [], set()  # (kind, K) whose kernel table is written: one each, the device run returns few files
    for key, runner in _RUNNERS.get(model, {}).items():
        if key[0] != B or not hasattr(runner, "graphs"):
            continue
        for gkey, (g, _, _) in runner.graphs.items():
            if not isinstance(g, torch.cuda.CUDAGraph):
                continue
            n = gkey[3] if gkey[0] == "greedy" else gkey[5] if gkey[0] == "spec" and len(gkey) > 5 else 1  # steps
            lines.append(f"graph {gkey}: {replay_us(g) / n:.0f} us per step")
            if gkey[0] in ("main-triton", "spec", "main", "greedy"):  # (a spec step: per k; verification: per T)
                try:
                    from torch.profiler import ProfilerActivity, profile
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        g.replay()
                        torch.cuda.synchronize()
                    ev = [e for e in prof.events() if e.device_type.name == "CUDA"]
                    kernel_us = sum(e.device_time for e in ev) / n
                    lines.append(f"  per step: {len(ev) / n:.0f} kernels, {kernel_us:.0f} us of kernel time")
                    table = prof.key_averages().table(sort_by="device_time_total", row_limit=60,
                                                      max_name_column_width=90)
                    lines.append("\n".join(table.splitlines()[:17]))
                    kind = (gkey[0], gkey[2] if gkey[0] in ("spec", "main") else None)
                    if os.environ.get("OUT") and kind not in tabled:
                        tabled.add(kind)
                        name = "_".join(map(str, gkey[:4] if gkey[0] == "spec" else gkey[:3:2] if gkey[0] == "main"
                                            else gkey[::3] if gkey[0] == "greedy" else gkey[:1]))
                        Path(os.environ["OUT"], f"profile_b{B}_{name}{'_' + tag if tag else ''}.txt").write_text(table)
                except Exception as e:  # profiler support for graph kernels varies
                    lines.append(f"  (profiler: {type(e).__name__}: {e})")
    return "\n".join(lines)


def check_graphed_step(model, ids, new: int, steps: int = 4, pinned: bool = False) -> dict:
    """Logits of the batch-1 graphed decode step (Triton step or compiled step: the runner that
    generate() then reuses) vs the eager Runner, over `steps` steps fed the same tokens. bf16: ~1e-2.
    pinned: for the check, every MoE layer's correction bias lifts the same top-k experts above all others
    (sigmoid scores lie in (0, 1)), so that no near-tie of random weights flips a choice between the two paths
    and what remains is the arithmetic's error; the biases are restored after."""
    biases = [m.gate.e_score_correction_bias for m in model.modules() if isinstance(m, MoE)] if pinned else []
    saved = [b.clone() for b in biases]
    for b in biases:
        b[:model.config.num_experts_per_tok] += 10.0
    try:
        return _check_graphed_step(model, ids, new, steps)
    finally:
        for b, v in zip(biases, saved, strict=True):
            b.copy_(v)


def _check_graphed_step(model, ids, new: int, steps: int) -> dict:
    from mimo_flash.generation import KVCache
    from mimo_flash.generation.engine import _make_runner, prefill  # the runner generate() would build
    from mimo_flash.generation.runner import Runner

    B, P = ids.shape
    S = min(-(-(P + new + 2) // 64) * 64, model.config.max_position_embeddings + 2)
    gr = _make_runner(model, B, S, 0, "auto", True)
    # the same ring size as the graphed runner's: a different slot order rounds differently in bf16, and
    # with random weights one flipped expert choice doubles the error
    er = Runner(model, KVCache(model.config, B, S, device=model.device, dtype=model.dtype, slack=gr.cache.slack), S)
    with torch.no_grad():
        lg, _ = prefill(gr, ids, None, 512, keep_hidden=False)
        le, _ = prefill(er, ids, None, 512, keep_hidden=False)
        tok = le.argmax(-1)
        errs = []
        for i in range(steps):
            pos = torch.full((B, 1), P + i, device=ids.device, dtype=torch.long)
            a, _ = gr.main(tok[:, None], pos, None, P + i + 1, graph=True)
            b, _ = er.main(tok[:, None], pos, None, P + i + 1)
            a, b = a.float(), b.float()
            errs.append(float((a - b).norm() / b.norm()))
            assert torch.isfinite(a).all()
            tok = b[:, -1].argmax(-1)
    gr.cache.reset()
    return dict(max_rel_err=max(errs), tune=gr.tune, triton=gr.triton, notes=list(gr.notes))


def sweep_settings(cfg: dict) -> dict:
    """A sweep config -> override() arguments: option names (decode_prefetch, decode_pdl, ...) as they are,
    field names of options.TritonStepTuning (tile, max_k, down_early, ...) into the triton_step option."""
    import dataclasses

    from mimo_flash.options import Options, options

    opt_names = {f.name for f in dataclasses.fields(Options)}
    tuning = {k: v for k, v in cfg.items() if k not in opt_names}
    out = {k: v for k, v in cfg.items() if k in opt_names}
    if tuning:
        out["triton_step"] = dataclasses.replace(options().triton_step, **tuning)  # unknown names: TypeError
    return out


def sweep_triton_step(model, ids, new: int, configs: list[dict]) -> list[dict]:
    """For each config (sweep_settings: option names and TritonStepTuning fields): replay time of the batch-1
    greedy step's graph (Triton step) and, without PDL (where kernel times do not overlap), each kernel's
    average time in it."""
    from torch.profiler import ProfilerActivity, profile

    from mimo_flash.generation.engine import _RUNNERS
    from mimo_flash.options import override

    rows = []
    for cfg in configs:
        try:
            _RUNNERS.pop(model, None)
            with override(**sweep_settings(cfg)):  # read when the runner builds its Triton step
                generate(model, ids, max_new_tokens=new, compile=True, eos_token_id=[])
            runner = next(iter(_RUNNERS[model].values()))
            for gkey, (g, _, _) in runner.graphs.items():
                if gkey[0] != "greedy":
                    continue
                row = dict(cfg, pdl_used=runner._triton_step.pdl, bucket=gkey[2], steps=gkey[3],
                           us=replay_us(g) / gkey[3])
                if not row["pdl_used"]:
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        g.replay()
                        torch.cuda.synchronize()
                    per = {}
                    for e in prof.events():
                        if e.device_type.name == "CUDA":
                            n = e.name[:40]
                            c, t = per.get(n, (0, 0.0))
                            per[n] = (c + 1, t + e.device_time)
                    row["kernels"] = {n: dict(calls=c, avg_us=round(t / c, 2)) for n, (c, t) in per.items()}
                rows.append(row)
                log(f"sweep: {cfg}: {row['us']:.0f} us per step" + ("; per kernel (calls x avg us): " + ", ".join(
                    f"{n} {v['calls']}x{v['avg_us']}" for n, v in row["kernels"].items()) if "kernels" in row else ""))
        finally:
            _RUNNERS.pop(model, None)
    return rows


def agree(a: torch.Tensor, b: torch.Tensor, P: int) -> float:
    """Mean over rows of the fraction of leading new tokens that agree."""
    a, b = a[:, P:].cpu(), b[:, P:].cpu()
    n = min(a.shape[1], b.shape[1])
    same = (a[:, :n] == b[:, :n]).long().cumprod(1).sum(1).float()
    return float(same.mean() / n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--layers", type=int, default=None,
                    help="cut the preset to this many layers (the released dimensions: --preset flash --layers 4)")
    ap.add_argument("--fp8", action="store_true", help="FP8-resident weights, as released (128x128 block scales)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--spec", type=int, nargs="+", default=[0, 3], help="num_speculative_tokens values (0 = plain)")
    ap.add_argument("--no-compile", action="store_true", help="CUDA graphs of eager steps only")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("BENCH_BUDGET_S", 340)))
    ap.add_argument("--cache-report", action="store_true")
    ap.add_argument("--before", action="store_true",
                    help="also time batch 1 K=0 without the Triton step (the torch.compile'd step)")
    ap.add_argument("--sweep", nargs="?", const="[{}, {\"decode_prefetch\": false}, {\"decode_pdl\": false}]",
                    default=None,
                    help="time the batch-1 Triton step's graph under other settings: a JSON list of dicts of option "
                         "names (decode_prefetch, decode_pdl) and options.TritonStepTuning fields (tile, max_k, "
                         "down_early, ...) (default: as is, no prefetch, no PDL)")
    ap.add_argument("--device", default="cuda", help="cpu only to check this script (tiny sizes)")
    ap.add_argument("--no-triton", action="store_true",
                    help="options().decode_triton='off' for the whole run: batch-1 steps, speculative verifications "
                         "and MTP drafts through the compiled path (to compare with a run without this flag)")
    ap.add_argument("--experts", nargs="+", default=None, choices=list(DECODE_EXPERTS),
                    help="options().decode_experts variants, side by side: each batch and K runs once per variant "
                         "(fresh graphs each; default: the option's value alone)")
    ap.add_argument("--option", action="append", default=[], metavar="NAME=JSON",
                    help="set options().NAME for the whole run (e.g. decode_experts=\"triton\"); repeatable")
    args = ap.parse_args(argv)
    if args.option:  # before anything reads the options
        from mimo_flash.options import set_options
        try:
            set_options(**{k: json.loads(v) for k, _, v in (o.partition("=") for o in args.option)})
        except (ValueError, TypeError) as e:
            ap.error(f"--option: {e}")
    if args.no_triton:
        from mimo_flash.options import set_options
        set_options(decode_triton="off")
    if args.cache_report:
        print(format_bytes_report(MiMoConfig.preset("flash"), name="flash"))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/decode.py needs a CUDA GPU (use --cache-report for the cache bytes)")
        return 1
    import transformers
    name = torch.cuda.get_device_properties(0).name if args.device == "cuda" else "cpu"
    log(f"device {name}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"date {datetime.date.today()}, command: {' '.join(sys.argv)}")
    results = dict(device=name, torch=torch.__version__, transformers=transformers.__version__,
                   date=str(datetime.date.today()), command=" ".join(sys.argv), runs=[])
    bw = copy_bandwidth() if args.device == "cuda" else 1.0
    results["copy_bandwidth"] = bw
    log(f"device-to-device copy: {bw / 1e12:.2f} TB/s (read + write)")

    torch.manual_seed(0)
    cut = {} if args.layers is None else dict(num_hidden_layers=args.layers)
    config = MiMoConfig.preset(args.preset, torch_dtype="bfloat16", **cut)
    model = random_model(config, torch.device(args.device), torch.bfloat16, fp8=args.fp8)
    log(f"{args.preset}{'' if args.layers is None else f' cut to {args.layers} layers'}"
        f"{', FP8-resident' if args.fp8 else ''}: {model.num_parameters() / 1e9:.2f}B parameters "
        f"({model.num_parameters(active=True) / 1e9:.2f}B active)")
    tf = None
    if not args.no_transformers:
        try:
            cls = getattr(transformers, "MiMoV2FlashForCausalLM")
            d = Path(tempfile.mkdtemp(prefix="mimo-bench-"))
            model.save_pretrained(d)
            tf = cls.from_pretrained(d, dtype=torch.bfloat16).to(args.device).eval()
            log(f"transformers twin loaded ({type(tf).__name__}, attention {tf.config._attn_implementation}, "
                f"experts {getattr(tf.config, '_experts_implementation', '?')})")
        except Exception as e:  # transformers without mimo_v2_flash, or a loading problem
            log(f"transformers twin unavailable: {type(e).__name__}: {e}")
            results["transformers_error"] = f"{type(e).__name__}: {e}"

    g = torch.Generator().manual_seed(1)
    table = []
    if args.device == "cuda" and 1 in args.batch:
        try:
            ids1 = torch.randint(0, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
            chk = check_graphed_step(model, ids1.to(args.device), args.new, pinned=True)
            free = check_graphed_step(model, ids1.to(args.device), args.new)
            ok = chk["max_rel_err"] < 3e-2
            chk["unpinned_max_rel_err"] = free["max_rel_err"]
            log(f"check: batch-1 graphed step (triton={chk['triton']}, tune={chk['tune']}) vs eager logits, the "
                f"experts pinned: max rel err {chk['max_rel_err']:.2e} over 4 steps -> {'OK' if ok else 'MISMATCH'}"
                f"; routed freely (random weights: near-ties may flip a choice): {free['max_rel_err']:.2e}"
                + (f"; notes: {chk['notes']}" if chk["notes"] else ""))
            results["graphed_check"] = dict(chk, ok=ok)
        except Exception as e:
            log(f"check of the graphed step failed: {type(e).__name__}: {str(e)[:400]}")
            traceback.print_exc(limit=4)
            results["graphed_check"] = dict(error=f"{type(e).__name__}: {e}")
    from mimo_flash.generation.engine import _RUNNERS
    from mimo_flash.options import options, override
    variants = args.experts or [options().decode_experts]
    for B, variant, K in ((B, v, K) for B in args.batch for v in variants for K in args.spec):
        if K == args.spec[0] and variant == variants[0]:
            ids = torch.randint(0, config.vocab_size, (B, args.prompt), generator=g).to(args.device)
            tf_row = None
        if K == args.spec[0]:  # each variant: its own graphs, and its plain tokens as the reference
            ref = None
            if len(variants) > 1:
                _RUNNERS.pop(model, None)
        with override(decode_experts=variant):
            if time.perf_counter() - T0 > args.budget_s:
                log(f"batch {B} K={K}: skipped (time budget)")
                continue
            compile = not args.no_compile
            try:
                r = time_ours(model, ids, args.new, K, compile)
            except Exception as e:
                log(f"batch {B} K={K} compile={compile} failed: {type(e).__name__}: {str(e)[:400]}")
                traceback.print_exc(limit=3)
                if not compile:
                    continue
                compile = False
                try:  # the eager graphs: a failure of this setting is logged and the run goes on to the next
                    r = time_ours(model, ids, args.new, K, compile)
                except Exception as e:
                    log(f"batch {B} K={K} compile=False failed too: {type(e).__name__}: {str(e)[:400]}")
                    results["runs"].append(dict(engine="mimo-flash", batch=B, K=K, experts=variant,
                                                error=f"{type(e).__name__}: {str(e)[:400]}"))
                    continue
            toks = r.pop("tokens")
            if ref is None:
                ref = toks
            row = dict(batch=B, K=K, compile=compile, experts=variant, **r)
            if K == 0:
                S = -(-(args.prompt + args.new + 2) // 64) * 64
                nbytes = step_bytes(model, B, S, args.prompt + args.new // 2)
                row["step_bytes"] = nbytes
                row["bandwidth"] = nbytes / (r["decode_s"] / (args.new - 1))
            else:
                row["same_tokens_as_plain"] = agree(toks, ref, args.prompt)
                row["step_ms"] = r["decode_s"] / max(r["steps"], 1) * 1e3
                S = -(-(args.prompt + args.new + 2 * K + 2) // 64) * 64
                row["step_bytes"] = step_bytes(model, B, S, args.prompt + args.new // 2, K, spec=True)
                row["floor_ms"] = row["step_bytes"] / bw * 1e3
                if B == 1 and time.perf_counter() - T0 < args.budget_s:
                    from mimo_flash.options import override
                    try:
                        with override(spec_graph=False):
                            rb = time_ours(model, ids, args.new, K, compile)
                        row["step_ms_before"] = rb["decode_s"] / max(rb["steps"], 1) * 1e3
                        row["decode_tok_s_before"] = rb["decode_tok_s"]
                        row["same_tokens_as_step_by_step"] = bool(torch.equal(rb["tokens"], toks))
                        log(f"ours  B=1 K={K} step-by-step (before): decode {rb['decode_tok_s']:.0f} tok/s, "
                            f"{row['step_ms_before']:.2f} ms/step; whole-step graph {row['step_ms']:.2f} ms/step; "
                            f"same tokens: {row['same_tokens_as_step_by_step']}")
                    except Exception as e:
                        log(f"step-by-step comparison failed: {type(e).__name__}: {str(e)[:300]}")
            log(f"ours  B={B} K={K}: decode {row['decode_tok_s']:.0f} tok/s, e2e {row['e2e_tok_s']:.0f} tok/s, "
                f"prefill {row['prefill_s'] * 1e3:.0f} ms, first call {row['first_call_s']:.1f} s"
                + (f", acceptance length {row['acceptance_length']:.2f}" if K else "")
                + (f", {row['bandwidth'] / 1e12:.2f} TB/s ({row['bandwidth'] / bw:.0%} of copy)"
                   if K == 0 and args.device == "cuda" else ""))
            if tf is not None and tf_row is None and time.perf_counter() - T0 < args.budget_s:
                try:
                    tf_row = time_transformers(tf, ids, args.new)
                    ttoks = tf_row.pop("tokens")
                    tf_row["same_tokens_as_ours"] = agree(ttoks, ref, args.prompt)
                    log(f"transformers B={B}: decode {tf_row['decode_tok_s']:.0f} tok/s, e2e "
                        f"{tf_row['e2e_tok_s']:.0f} tok/s, prefill {tf_row['prefill_s'] * 1e3:.0f} ms, greedy "
                        f"agreement with ours {tf_row['same_tokens_as_ours']:.0%}")
                    results["runs"].append(dict(engine="transformers", batch=B, **tf_row))
                except Exception as e:
                    log(f"transformers B={B} failed: {type(e).__name__}: {str(e)[:400]}")
            if tf_row is not None:
                row["ratio_decode"] = row["decode_tok_s"] / tf_row["decode_tok_s"]
                row["ratio_e2e"] = row["e2e_tok_s"] / tf_row["e2e_tok_s"]
            from mimo_flash.generation.engine import _RUNNERS
            notes = [n for rn in _RUNNERS.get(model, {}).values() for n in rn.notes]
            if notes:
                row["fallbacks"] = sorted(set(notes))
                log(f"fallbacks: {row['fallbacks']}")
            results["runs"].append(dict(engine="mimo-flash", **row))
            table.append((row, tf_row))
        if K != args.spec[-1]:
            continue
        if args.device == "cuda":  # replay time of every graph of this batch size and variant (decode, verify, MTP)
            try:
                rep = graph_report(model, B, variant if len(variants) > 1 else "")
                log("graphs:\n" + rep)
                results.setdefault("graph_reports", []).append(rep)
            except Exception as e:
                log(f"graph report failed: {type(e).__name__}: {e}")
        if variant != variants[-1]:
            continue
        del ids
        if args.device == "cuda":
            torch.cuda.empty_cache()

    before = None
    if args.device == "cuda" and args.before and 1 in args.batch and time.perf_counter() - T0 < args.budget_s:
        from mimo_flash.generation.engine import _RUNNERS
        from mimo_flash.options import override
        _RUNNERS.pop(model, None)
        try:
            ids = torch.randint(0, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
            with override(decode_triton="off"):
                before = time_ours(model, ids.to(args.device), args.new, 0, not args.no_compile)
            before.pop("tokens")
            S = -(-(args.prompt + args.new + 2) // 64) * 64
            before["bandwidth"] = step_bytes(model, 1, S, args.prompt + args.new // 2) / (before["decode_s"] / (args.new - 1))
            log(f"before (compiled step, no Triton step) B=1 K=0: decode {before['decode_tok_s']:.0f} tok/s, "
                f"{before['bandwidth'] / 1e12:.2f} TB/s ({before['bandwidth'] / bw:.0%} of copy)")
            log("graphs (before):\n" + graph_report(model, 1))
            results["before_b1"] = before
        except Exception as e:
            log(f"before pass failed: {type(e).__name__}: {str(e)[:300]}")
        finally:
            _RUNNERS.pop(model, None)
    if args.device == "cuda" and args.sweep and 1 in args.batch and time.perf_counter() - T0 < args.budget_s:
        try:
            ids = torch.randint(0, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
            results["sweep"] = sweep_triton_step(model, ids.to(args.device), 64, json.loads(args.sweep))
        except Exception as e:
            log(f"sweep failed: {type(e).__name__}: {str(e)[:300]}")
    out = os.environ.get("OUT")
    if out:
        Path(out, "decode.json").write_text(json.dumps(results, indent=1, default=str))
    print()
    print(f"{name}, {datetime.date.today()}, {args.preset} preset, prompt {args.prompt}, {args.new} new tokens, "
          f"bf16, greedy; copy bandwidth {bw / 1e12:.2f} TB/s")
    print("| batch | K | ours decode tok/s | transformers decode tok/s | ratio | ours e2e tok/s | tf e2e tok/s | "
          "e2e ratio | accept len | batch-1 bandwidth |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    def k_txt(row):
        return f"{row['K']}" + (f" [{row['experts']}]" if len(variants) > 1 else "")

    for row, tfr in table:
        bwtxt = (f"{row['bandwidth'] / 1e12:.2f} TB/s = {row['bandwidth'] / bw:.0%}"
                 if row["K"] == 0 and row["batch"] == 1 else "")
        print(f"| {row['batch']} | {k_txt(row)}{'' if row['compile'] else ' (eager graphs)'} | "
              f"{row['decode_tok_s']:.0f} | {tfr['decode_tok_s']:.0f} | {row['ratio_decode']:.1f}x | "
              f"{row['e2e_tok_s']:.0f} | {tfr['e2e_tok_s']:.0f} | {row['ratio_e2e']:.1f}x | "
              f"{row['acceptance_length']:.2f} | {bwtxt} |" if tfr else
              f"| {row['batch']} | {k_txt(row)} | {row['decode_tok_s']:.0f} | - | - | {row['e2e_tok_s']:.0f} | - | - | "
              f"{row['acceptance_length']:.2f} | {bwtxt} |")
    for row, _ in table:
        if row["K"] and "step_ms" in row:
            plain = next((r for r, _ in table if r["batch"] == row["batch"] and r["K"] == 0
                          and r["experts"] == row["experts"]), None)
            tok_ms = plain["decode_s"] / (args.new - 1) * 1e3 if plain else float("nan")
            print(f"batch {row['batch']} K={k_txt(row)}: {row['step_ms']:.2f} ms per speculative step"
                  + (f" (step-by-step before: {row['step_ms_before']:.2f} ms, same tokens: "
                     f"{row.get('same_tokens_as_step_by_step')})" if "step_ms_before" in row else "")
                  + (f"; byte floor {row['floor_ms']:.3f} ms ({row['step_bytes'] / 1e9:.3f} GB at the copy "
                     f"bandwidth): {row['step_ms'] / row['floor_ms']:.2f}x it" if args.device == "cuda" else "")
                  + f"; plain token {tok_ms:.3f} ms -> break-even acceptance length {row['step_ms'] / tok_ms:.2f}")
    if before is not None:
        print(f"batch 1 K=0 before (compiled step, no Triton step): {before['decode_tok_s']:.0f} tok/s, "
              f"{before['bandwidth'] / 1e12:.2f} TB/s = {before['bandwidth'] / bw:.0%}")
    if "graphed_check" in results:
        print(f"graphed-step check: {results['graphed_check']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
