"""Resume is exact: a `mimo-flash train` run killed with SIGKILL after a checkpoint and resumed ends
with bitwise the same weights (and the same metrics) as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from mimo_flash.training.dcp import latest
from mimo_flash.training.demo import train_tokenizer

TEXT = ("The for statement is used to iterate over the elements of a sequence (such as a string, tuple or "
        "list) or other iterable object. The while statement is used for repeated execution as long as an "
        "expression is true. The if statement is used for conditional execution. ")
STEPS = 40


def _cmd(tmp: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mimo_flash.cli", "train", "--preset", "tiny", "--tokenizer", str(tmp / "tok"),
            "--data", str(tmp / "corpus.txt"), "--out", str(out), "--steps", str(STEPS), "--seq-len", "48",
            "--batch-size", "2", "--lr", "3e-3", "--warmup-steps", "3", "--save-every", "4", "--deterministic",
            "--no-progress", "--set", "num_hidden_layers=3", *extra]


def _env() -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def test_sigkill_and_resume_is_bitwise_exact(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT * 40)
    train_tokenizer([TEXT * 5], 300, tmp_path / "tok")
    env = _env()

    # the reference: never interrupted
    ref = tmp_path / "ref"
    subprocess.run(_cmd(tmp_path, ref), env=env, check=True, capture_output=True, timeout=300)

    # killed with SIGKILL as soon as its first checkpoint is complete
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(tmp_path, run), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while latest(run / "checkpoints") is None:
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = latest(run / "checkpoints")
    assert killed_at < STEPS and not (run / "final").exists()

    # resumed: picks up the newest complete checkpoint and finishes
    res = subprocess.run(_cmd(tmp_path, run, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    resumed_at = int(res.stdout.split("at step ")[1].split()[0])
    assert killed_at <= resumed_at < STEPS

    a = load_file(ref / "final" / "model.safetensors")
    b = load_file(run / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the balancing biases moved (from scratch the rate is 1e-3) and match too
    bias = [k for k in a if k.endswith("e_score_correction_bias")]
    assert bias and any(a[k].abs().sum() > 0 for k in bias)

    # the metrics log holds every step once, with the same numbers
    ma = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in mb] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]
