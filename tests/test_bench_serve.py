"""bench/serve.py end to end on the CPU at tiny sizes: it starts `mimo-flash serve` (plain, then with adaptive
speculation) on a tiny checkpoint, sends requests of varied lengths and reports each run as a JSON line, beside
generate()'s batch throughput on the same checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import tiny_model
from harness import free_port
from serving_helpers import make_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def checkpoint(tmp_path: Path) -> Path:
    """A tiny model saved with a small tokenizer."""
    d = tmp_path / "ckpt"
    d.mkdir()
    tok = make_tokenizer(d)
    tiny_model(seed=5, vocab_size=tok.vocab_size).save_pretrained(d)
    return d


def test_bench_serve_runs_on_cpu(tmp_path):
    out = tmp_path / "runs.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--model", str(checkpoint(tmp_path)),
                        "--input-len", "12", "--output-len", "8", "--range-ratio", "0.5", "--concurrency", "1", "3",
                        "--num-prompts", "6", "--speculative", "0", "auto", "--max-context", "64", "--warmup", "1",
                        "--port", str(free_port()), "--json", str(out), "--baseline",
                        "--baseline-option", 'cache_attention="torch"',  # set in the baseline's own process
                        # a serve flag passed through (the leading space keeps argparse from reading it as ours)
                        "--server-args", " --max-queue 300"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(x["speculative"], x["concurrency"]) for x in runs] == [("0", 1), ("0", 3), ("auto", 1), ("auto", 3)]
    for x in runs:
        assert x["failed"] == 0 and x["completed"] == (4 if x["concurrency"] == 1 else 6), x
        assert x["server_args"] == " --max-queue 300"
        assert x["range_ratio"] == 0.5 and x["output_tok_s"] > 0 and x["ttft_s"]["p50"] > 0
        # --baseline: generate()'s batch-3 tok/s, once, and each run's fraction of it
        assert x["generate_tok_s"] == runs[0]["generate_tok_s"] > 0
        assert x["of_generate"] == x["output_tok_s"] / x["generate_tok_s"]
    assert 'generate() baseline: batch 3, in=12 out=8 cache_attention="torch": ' in r.stdout
    # the server's scheduler-thread seconds and forwards per phase, over each run
    for x in runs:
        assert set(x["scheduler_s"]) == {"admit", "prefill", "decode"} and all(v > 0 for v in x["scheduler_s"].values())
        assert x["forwards"]["prefill"] >= 1 and x["forwards"]["decode"] >= 1, x["forwards"]
    assert "scheduler thread: admit" in r.stdout
    # requests of varied lengths (ignore_eos: each produces its own max_tokens, 4 .. 12)
    assert len({round(x["output_tok_s"] * x["duration_s"]) for x in runs}) > 1
    spec = [x for x in runs if x["speculative"] == "auto"]
    # (auto starts by timing k = 3 steps: drafts were verified; its steps are counted by k)
    assert all(x["spec_steps"] for x in spec) and sum(x["spec_draft_tokens"] for x in spec) > 0, spec
    assert all(0 <= x["spec_accepted_tokens"] <= x["spec_draft_tokens"] for x in spec)
    assert all(k.startswith("k=") for x in spec for k in x["spec_steps"])


def test_bench_serve_http_only_counts_every_token_at_the_step_rate(tmp_path):
    """--http-only: serve's HTTP process with no model, one token per open request every step. Every request gets
    its --output-len tokens, and a request's time per output token is the step (no model to be slower) or more."""
    out = tmp_path / "runs.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--model", str(checkpoint(tmp_path)),
                        "--http-only", "5", "--input-len", "12", "--output-len", "20", "--concurrency", "1", "8",
                        "--num-prompts", "16", "--max-context", "64", "--warmup", "1", "--port", str(free_port()),
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(x["http_only_step_ms"], x["concurrency"], x["completed"], x["failed"]) for x in runs] == \
        [(5.0, 1, 4, 0), (5.0, 8, 16, 0)]
    for x in runs:
        assert round(x["output_tok_s"] * x["duration_s"]) == 20 * x["completed"], x
        assert x["tpot_s"]["p50"] >= 0.004, x["tpot_s"]
    assert "http-only step=5.0 ms" in r.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--http-only", "0"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--http-only takes a step in milliseconds > 0, got 0.0" in bad.stderr
