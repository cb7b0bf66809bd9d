"""Serving benchmark in the shape of `vllm bench serve`: requests of given lengths at a given concurrency or
request rate against an OpenAI-compatible server; request throughput, output tok/s, TTFT, TPOT, ITL.

    # against a running server (any OpenAI-compatible one: mimo-flash, vLLM, SGLang)
    python bench/serve.py --url http://127.0.0.1:8000 --input-len 64 --output-len 64 --concurrency 16
    # a server it starts itself (a subprocess running `mimo-flash serve`), random weights of a preset
    python bench/serve.py --preset mini --device cuda --concurrency 1 16 64 --slots 64 1
    python bench/serve.py --model CKPT_DIR --concurrency 16 --request-rate 8

--slots 64 1: the same run against the scheduler with 64 slots and then with 1 slot (the previous server's
one-request-at-a-time behaviour); --threads 1 2 likewise runs a CPU server with each thread count; --overlap on
off the server with and without the look-ahead of its greedy decode steps; --compile: a started server's decode
graphs compiled (serve --compile; generate's figures in bench/decode.py are of compiled graphs); --decode-experts dense
triton, --admit-wait 0.005 0.05 and --server-args "" " --graph-prefill": one run per value (each server-args value
is split like a shell line; one that starts with "--" needs a leading space, or argparse reads it as this script's flag).
--baseline: before the servers, generate() at batch = the largest concurrency on the same checkpoint and device
(prompts of --input-len, --output-len new tokens, no EOS; compiled with --compile, as the server's graphs are; a warm-up
call, then one timed) in a process of its own, and each run's output tok/s as a fraction of it (issue 23's target: at
concurrency 64, 0.7x generate's batch 64).
--speculative 0 3 auto: the same runs without and with MTP speculation (a started server's --speculative K or
auto; every request speculates); a run's MTP acceptance and its steps by drafts per request (from the server's
/metrics counters) are reported when it speculated. --shared-prefix N: every prompt starts with the same N tokens
(prefix caching's TTFT gain: compare with --prefix-blocks 0). Prompts are random token ids sent as token-id
prompts, streamed, greedy (--temperature T: sampled), ignore_eos (every request produces exactly --output-len
tokens, as vLLM's benchmark does). TTFT: request sent -> first streamed token; TPOT: (latency - TTFT) / (output
tokens - 1) per request; ITL: the gaps between streamed chunks.
--http-only STEP_MS: no model. serve's HTTP process (serving/remote.py's http_main, as `serve` runs it) is fed one
token per open request every STEP_MS ms by a process of this script's: what the HTTP side and this client carry on
this machine, the ceiling of any run's output tok/s here (on two CPU cores, at concurrency 64 and 2 ms steps:
18,000-23,500 tok/s of the ideal 32,000, where the httpx client this script used before counted 5,500:
docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs) if xs else float("nan"), "p50": percentile(xs, 50),
            "p99": percentile(xs, 99)}


async def one_request(session, url: str, model: str, prompt: list[int], out_len: int,
                      temperature: float = 0.0) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": temperature, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, last, itl, tokens, err = None, t0, [], 0, None
    try:
        async with session.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                return {"ok": False, "error": f"{r.status} {(await r.read())[:200]!r}"}
            async for raw in r.content:  # one line at a time; an SSE event is "data: {json}" then an empty line
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    err = chunk["error"]["message"]
                    continue
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - t0
                else:
                    itl.append(now - last)
                last = now
    except Exception as e:  # a refused connection, a reset: counted as failed
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    latency = time.perf_counter() - t0
    if err is not None or ttft is None:
        return {"ok": False, "error": err or "no output"}
    return {"ok": True, "ttft": ttft, "latency": latency, "itl": itl, "tokens": tokens,
            "tpot": (latency - ttft) / (tokens - 1) if tokens > 1 else None}


async def run_load(url: str, model: str, prompts: list[list[int]], out_lens: list[int], concurrency: int,
                   rate: float, temperature: float = 0.0) -> dict:
    import aiohttp  # vllm bench serve's client (httpx's, before, was the ceiling at concurrency 64: see --http-only)

    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3600.0)) as session:
        async def go(p, n):
            async with sem:
                return await one_request(session, url, model, p, n, temperature)

        t0 = time.perf_counter()
        tasks = []
        rng = random.Random(0)
        for p, n in zip(prompts, out_lens, strict=True):
            tasks.append(asyncio.create_task(go(p, n)))
            if rate != float("inf"):  # Poisson arrivals
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    out_tokens = sum(r["tokens"] for r in ok)
    return {"completed": len(ok), "failed": len(results) - len(ok),
            "errors": sorted({r["error"] for r in results if not r["ok"]})[:3], "duration_s": duration,
            "request_throughput": len(ok) / duration, "output_tok_s": out_tokens / duration,
            "total_tok_s": (out_tokens + sum(len(p) for p in prompts)) / duration,
            "ttft_s": summary([r["ttft"] for r in ok]),
            "tpot_s": summary([r["tpot"] for r in ok if r["tpot"] is not None]),
            "itl_s": summary([x for r in ok for x in r["itl"]]), "e2el_s": summary([r["latency"] for r in ok])}


def make_prompts(n: int, in_len: int, out_len: int, vocab: int, shared: int, seed: int,
                 ratio: float = 0.0) -> tuple[list[list[int]], list[int]]:
    """n prompts of random token ids (the first `shared` the same in all) and their output lengths: in_len and
    out_len each, or (ratio > 0, as vllm bench serve's --random-range-ratio) drawn uniformly from
    [L * (1 - ratio), L * (1 + ratio)]."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(shared)]
    length = lambda L: max(1, round(rng.uniform(L * (1 - ratio), L * (1 + ratio)))) if ratio else L  # noqa: E731
    prompts, outs = [], []
    for _ in range(n):
        prompts.append(prefix + [rng.randrange(3, vocab) for _ in range(max(1, length(in_len) - shared))])
        outs.append(length(out_len))
    return prompts, outs


def random_checkpoint(preset: str, device: str) -> Path:
    """A preset with random weights saved with a word-level tokenizer covering its vocabulary."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mimo_flash import MiMoConfig, MiMoForCausalLM

    d = Path(tempfile.mkdtemp(prefix=f"mimo-serve-{preset}-"))
    torch.manual_seed(0)
    config = MiMoConfig.preset(preset, torch_dtype="bfloat16" if device == "cuda" else "float32")
    MiMoForCausalLM(config).save_pretrained(d)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(config.vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w1"}))
    return d


def generate_baseline(ckpt: str, device: str, batch: int, in_len: int, out_len: int, compile: bool, result,
                      options: dict) -> None:
    """(A spawned process) generate()'s end-to-end output tok/s at `batch` rows under `options` (set_options
    arguments), put into `result`."""
    import torch

    from mimo_flash import MiMoForCausalLM
    from mimo_flash.generation import generate
    from mimo_flash.options import set_options

    set_options(**options)

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # (serve's --dtype auto)
    model = MiMoForCausalLM.from_pretrained(ckpt, dtype=dtype, device=dev).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, in_len), generator=torch.Generator().manual_seed(0)).to(dev)
    kw = dict(max_new_tokens=out_len, eos_token_id=[], compile=compile)
    generate(model, ids, **kw)  # warm-up: graphs, compilation
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = generate(model, ids, **kw)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    result.put((out.shape[1] - in_len) * batch / (time.perf_counter() - t0))


def baseline_options(args) -> dict:
    """--baseline-option NAME=JSON ... as set_options arguments."""
    return {k: json.loads(v) for k, _, v in (o.partition("=") for o in args.baseline_option)}


def baseline(args, ckpt: Path) -> float:
    import multiprocessing

    mp = multiprocessing.get_context("spawn")
    result = mp.Queue()
    p = mp.Process(target=generate_baseline, args=(str(ckpt), args.device, max(args.concurrency), args.input_len,
                                                   args.output_len, args.compile, result,
                                                   baseline_options(args)))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise SystemExit(f"the generate() baseline failed (exit {p.exitcode})")
    tok_s = result.get()
    print(f"generate() baseline: batch {max(args.concurrency)}, in={args.input_len} out={args.output_len}"
          f"{' compiled' if args.compile else ''}{' ' + ' '.join(args.baseline_option) if args.baseline_option else ''}: "
          f"{tok_s:.1f} output tok/s (prefill included)", flush=True)
    return tok_s


def _http_only_engine(conn, step_s: float) -> None:
    """(--http-only) The model's end of serving/remote.py's pipe, with no model: every step_s seconds one token
    (id 100, text " x") to every open request, the last one finishing it by length."""
    import threading

    from mimo_flash.serving.requests import Event

    open_, lock = {}, threading.Lock()

    def receive():
        while True:
            msg = conn.recv()
            if msg[0] == "submit":
                _, rid, fields = msg
                with lock:
                    open_[rid] = [0, fields["max_tokens"], len(fields["prompt"])]
                conn.send(("ack", rid, None))
            elif msg[0] == "cancel":
                with lock:
                    open_.pop(msg[1], None)
            elif msg[0] == "metrics":
                conn.send(("metrics", msg[1], ""))
    threading.Thread(target=receive, daemon=True).start()
    while True:
        time.sleep(step_s)
        events = []
        with lock:
            for rid, st in list(open_.items()):
                st[0] += 1
                if st[0] < st[1]:
                    events.append((rid, Event([100], " x")))
                else:
                    events.append((rid, Event([100], " x", finish="length", prompt_tokens=st[2],
                                              completion_tokens=st[1])))
                    del open_[rid]
        if events:
            conn.send(("events", events))


def _http_only_main(ckpt: str, port: int, step_s: float, S: int, vocab: int) -> None:
    """(A spawned process) serve's HTTP process (serving/remote.py http_main) fed by _http_only_engine."""
    import multiprocessing

    from mimo_flash.serving.remote import http_main

    mp = multiprocessing.get_context("spawn")
    mine, theirs = mp.Pipe()
    mp.Process(target=http_main, args=(theirs, ckpt, "bench", "127.0.0.1", port, S, vocab, S, 600.0,
                                       "http-only server listening")).start()
    _http_only_engine(mine, step_s)  # until terminated: the HTTP process then sees the pipe's end and exits


def start_http_only(args, ckpt: Path, port: int):
    import multiprocessing

    from mimo_flash import MiMoConfig

    vocab = MiMoConfig.from_pretrained(ckpt).vocab_size
    proc = multiprocessing.get_context("spawn").Process(
        target=_http_only_main, args=(str(ckpt), port, args.http_only / 1e3, args.max_context, vocab))
    proc.start()
    return proc, wait_for(proc, f"http://127.0.0.1:{port}")


def start_server(args, ckpt: Path, slots: int, port: int, speculative: str = "0", threads: int | None = None,
                 overlap: str = "on", experts: str | None = None, admit_wait: float | None = None, extra: str = ""):
    cmd = [sys.executable, "-m", "mimo_flash.cli", "serve", "--model", str(ckpt), "--port", str(port),
           "--name", "bench", "--device", args.device, "--max-slots", str(slots), "--speculative", str(speculative),
           "--max-context", str(args.max_context), "--prefill-chunk", str(args.prefill_chunk),
           "--prefix-blocks", str(args.prefix_blocks), "--max-queue", str(max(256, args.num_prompts))]
    for flag, v in (("--admit-wait", admit_wait), ("--prefill-tokens", args.prefill_tokens),
                    ("--threads", threads), ("--decode-experts", experts)):
        if v is not None:  # otherwise the server's default
            cmd += [flag, str(v)]
    if overlap == "off":
        cmd.append("--no-overlap")
    if args.compile:
        cmd.append("--compile")
    cmd += shlex.split(extra)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env)
    return proc, wait_for(proc, f"http://127.0.0.1:{port}")


def _exit_code(proc):
    """A subprocess.Popen's or a multiprocessing.Process's exit code (None while it runs)."""
    return proc.poll() if isinstance(proc, subprocess.Popen) else proc.exitcode


def stop(proc) -> None:
    proc.terminate()
    proc.wait(30) if isinstance(proc, subprocess.Popen) else proc.join(30)


def wait_for(proc, url: str) -> str:
    """url, once its /health answers; exits if the server's process ends or 600 s pass first."""
    import urllib.request

    deadline = time.time() + 600
    while time.time() < deadline:
        if _exit_code(proc) is not None:
            raise SystemExit(f"the server exited with {_exit_code(proc)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return url
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise SystemExit("the server did not come up within 600 s")


def server_counters(url: str) -> dict[str, int]:
    """A mimo-flash server's counters from /metrics: draft tokens verified ("draft"), accepted ("accepted"), steps by
    drafts per request ("k=0", "k=1", ...), the scheduler thread's seconds per phase ("s:admit", "s:prefill",
    "s:decode") and forwards per phase ("n:prefill", "n:decode"); {} from a server without them."""
    import urllib.request

    found = {}
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                name, _, value = line.rpartition(" ")
                found[name] = value
    except OSError:
        return {}
    out = {n: int(float(found.get(f"mimo_flash_spec_decode_{n}_tokens_total", 0))) for n in ("draft", "accepted")}
    steps = "mimo_flash_spec_decode_steps_total{k="
    out.update({f"k={n[len(steps) + 1:-2]}": int(float(v)) for n, v in found.items() if n.startswith(steps)})
    for name, kind in (("mimo_flash_scheduler_seconds_total", "s"), ("mimo_flash_forwards_total", "n")):
        out.update({f"{kind}:{n[len(name) + 8:-2]}": float(v) for n, v in found.items() if n.startswith(name + "{")})
    return out


def report(tag: str, r: dict) -> None:
    ratio = f" ({r['of_generate']:.2f}x generate)" if "of_generate" in r else ""
    ms = lambda d: f"{d['mean'] * 1e3:8.1f} {d['p50'] * 1e3:8.1f} {d['p99'] * 1e3:8.1f}"  # noqa: E731
    print(f"{tag}: {r['completed']} ok, {r['failed']} failed{' ' + str(r['errors']) if r['failed'] else ''}; "
          f"{r['duration_s']:.2f} s; {r['request_throughput']:.2f} req/s; output {r['output_tok_s']:.1f} tok/s; "
          f"total {r['total_tok_s']:.1f} tok/s{ratio}", flush=True)
    print(f"    (ms)  mean      p50      p99\n    TTFT {ms(r['ttft_s'])}\n    TPOT {ms(r['tpot_s'])}\n"
          f"    ITL  {ms(r['itl_s'])}\n    E2EL {ms(r['e2el_s'])}", flush=True)
    if r.get("spec_draft_tokens"):
        print(f"    MTP drafts accepted {r['spec_accepted_tokens']} / {r['spec_draft_tokens']} "
              f"({r['spec_accepted_tokens'] / r['spec_draft_tokens']:.1%})", flush=True)
    if r.get("scheduler_s"):
        print("    scheduler thread: " + ", ".join(
            f"{p} {r['scheduler_s'][p]:.2f} s" + (f" ({r['forwards'][p]} forwards)" if p in r.get("forwards", {}) else "")
            for p in r["scheduler_s"]), flush=True)
    if r.get("spec_steps"):
        print("    steps by drafts: " + ", ".join(f"{k} {n}" for k, n in sorted(r["spec_steps"].items())), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (otherwise one is started)")
    ap.add_argument("--model", help="checkpoint directory for the server this starts")
    ap.add_argument("--preset", default="mini", help="random weights of this preset when no --model/--url")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--served-name", default=None, help="model name to send (default: the server's first)")
    ap.add_argument("--vocab", type=int, default=None, help="token ids drawn below this (default: from the model)")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--shared-prefix", type=int, default=0, help="leading prompt tokens all requests share")
    ap.add_argument("--num-prompts", type=int, default=None, help="default: 4 x concurrency (at least 8)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--temperature", type=float, default=0.0, help="of every request (default 0: greedy)")
    ap.add_argument("--range-ratio", type=float, default=0.0,
                    help="input and output lengths uniform in [L(1-r), L(1+r)] (vllm bench serve's "
                         "--random-range-ratio; default 0: exactly --input-len and --output-len)")
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); default all at once")
    ap.add_argument("--slots", type=int, nargs="+", default=None,
                    help="started server: scheduler slots per run (default: the largest concurrency); 1 = the "
                         "one-at-a-time baseline")
    ap.add_argument("--max-context", type=int, default=None, help="default: max(2048, input + output length)")
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--prefix-blocks", type=int, default=64)
    ap.add_argument("--admit-wait", type=float, nargs="+", default=[None],
                    help="started server: its --admit-wait, one run per value (default: the server's default)")
    ap.add_argument("--speculative", nargs="+", default=["0"],
                    help="started server: its --speculative K or auto, one run per value (default 0: off)")
    ap.add_argument("--prefill-tokens", type=int, default=None, help="started server: its --prefill-tokens")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="started CPU server: its --threads, one run per value (default: the server's default)")
    ap.add_argument("--overlap", nargs="+", default=["on"], choices=["on", "off"],
                    help="started server: on (its default) or off (--no-overlap), one run per value")
    ap.add_argument("--compile", action="store_true", help="started server: its --compile (compiled decode graphs)")
    ap.add_argument("--server-args", nargs="+", default=[""],
                    help="started server: more `serve` flags, one string per run (e.g. \"\" \" --graph-prefill\": "
                         "a run without and one with; note the leading space)")
    ap.add_argument("--decode-experts", nargs="+", default=[None], choices=["dense", "grouped_mm", "triton"],
                    help="started server: its --decode-experts, one run per value (default: the server's default)")
    ap.add_argument("--baseline", action="store_true",
                    help="also time generate() at batch = the largest concurrency on the same checkpoint (see above)")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--warmup", type=int, default=2, help="requests before measuring (graph capture, compile)")
    ap.add_argument("--baseline-option", action="append", default=[], metavar="NAME=JSON",
                    help="set options().NAME in the --baseline process (e.g. cache_attention=\"triton\", to match "
                         "a server started with --server-args \" --cache-attention triton\"); repeatable")
    ap.add_argument("--http-only", type=float, default=None, metavar="STEP_MS",
                    help="no model: serve's HTTP process fed one token per open request every STEP_MS ms (what the "
                         "HTTP side and this client carry: the ceiling of a run's output tok/s on this machine)")
    ap.add_argument("--json", help="append one JSON line per run to this file")
    args = ap.parse_args()
    try:
        from mimo_flash.options import Options
        Options(**baseline_options(args))
    except (ValueError, TypeError) as e:
        ap.error(f"--baseline-option: {e}")
    if args.http_only is not None and not args.http_only > 0:
        ap.error(f"--http-only takes a step in milliseconds > 0, got {args.http_only}")
    if not 0 <= args.range_ratio < 1:
        ap.error(f"--range-ratio must be in [0, 1), got {args.range_ratio}")
    if args.max_context is None:
        args.max_context = max(2048, args.input_len + args.output_len)
    if args.num_prompts is None:
        args.num_prompts = max(8, 4 * max(args.concurrency))

    if args.url is not None and (args.baseline or args.http_only):
        ap.error("--baseline and --http-only start a server of their own (not --url)")
    ckpt = None
    if args.url is None:
        ckpt = Path(args.model) if args.model else random_checkpoint(args.preset, args.device)
    base = baseline(args, ckpt) if args.baseline else None
    slot_runs = [(None, None, None, None, None, None, "")] if args.url or args.http_only else [
        (slots, k, t, o, e, w, x) for k in args.speculative for slots in (args.slots or [max(args.concurrency)])
        for t in (args.threads or [None]) for o in args.overlap for e in args.decode_experts for w in args.admit_wait
        for x in args.server_args]
    for slots, spec, threads, overlap, experts, wait, extra in slot_runs:
        proc = None
        url = args.url
        if url is None:
            proc, url = (start_http_only(args, ckpt, args.port) if args.http_only else
                         start_server(args, ckpt, slots, args.port, spec, threads, overlap, experts, wait, extra))
        try:
            import urllib.request
            with urllib.request.urlopen(url + "/v1/models") as r:
                info = json.loads(r.read())["data"][0]
            name = args.served_name or info["id"]
            vocab = args.vocab
            if vocab is None:
                from mimo_flash import MiMoConfig
                vocab = MiMoConfig.from_pretrained(ckpt).vocab_size if ckpt else 1000
            warm, warm_out = make_prompts(args.warmup, args.input_len, args.output_len, vocab, 0, seed=1)
            if warm:
                asyncio.run(run_load(url, name, warm, warm_out, len(warm), float("inf")))
            for c in args.concurrency:
                prompts, out_lens = make_prompts(args.num_prompts if c > 1 else max(4, args.num_prompts // 8),
                                                 args.input_len, args.output_len, vocab, args.shared_prefix, seed=c,
                                                 ratio=args.range_ratio)
                before = server_counters(url)
                r = asyncio.run(run_load(url, name, prompts, out_lens, c, args.request_rate, args.temperature))
                after = server_counters(url)
                delta = {n: v - before.get(n, 0) for n, v in after.items()}
                r["spec_draft_tokens"], r["spec_accepted_tokens"] = delta.get("draft", 0), delta.get("accepted", 0)
                r["spec_steps"] = {n: v for n, v in delta.items() if n.startswith("k=") and v}
                r["scheduler_s"] = {n[2:]: v for n, v in delta.items() if n.startswith("s:")}
                r["forwards"] = {n[2:]: int(v) for n, v in delta.items() if n.startswith("n:")}
                tag = (f"{f'http-only step={args.http_only} ms ' if args.http_only else ''}"
                       f"slots={slots if slots else '?'}{f' speculative={spec}' if spec not in (None, '0') else ''}"
                       f"{'' if threads is None else f' threads={threads}'}"
                       f"{' overlap=off' if overlap == 'off' else ''}"
                       f"{'' if experts is None else f' decode-experts={experts}'}"
                       f"{'' if wait is None else f' admit-wait={wait}'}{f' [{extra.strip()}]' if extra.strip() else ''} concurrency={c} "
                       f"in={args.input_len} out={args.output_len}"
                       f"{f' range-ratio={args.range_ratio}' if args.range_ratio else ''}")
                if base:
                    r["generate_tok_s"], r["of_generate"] = base, r["output_tok_s"] / base
                report(tag, r)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps({"http_only_step_ms": args.http_only, "slots": slots, "speculative": spec, "threads": threads, "overlap": overlap,
                                            "decode_experts": experts, "admit_wait": wait, "server_args": extra,
                                            "temperature": args.temperature,
                                            "concurrency": c, "input_len": args.input_len,
                                            "output_len": args.output_len, "range_ratio": args.range_ratio,
                                            "shared_prefix": args.shared_prefix,
                                            "request_rate": args.request_rate, "device": args.device, **r}) + "\n")
        finally:
            if proc is not None:
                stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
