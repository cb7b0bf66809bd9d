"""bench/train_full.py on CPUs (gloo, tiny preset): its timing rows on 2 processes over two layouts (FSDP2 + EP=2,
and CP=2), and its resharding check: a DCP checkpoint written by 4 ranks (EP=4) resumed on 2 (EP=2) continues the
loss curve of the run that never stopped, in fp32 to rounding (20-40 s each, by the machine's load). (tests/test_training_dist.py resumes 2 ranks on 2
and on 1, tests/test_dcp.py loads 2 ranks' states on 4 without training on; this is 4 -> 2 through the Trainer.)"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest

from harness import run_python

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from train_full import Layout  # noqa: E402


def _bench(tmp_path: Path, *argv: str, device: str = "cpu", preset: str = "tiny") -> dict:
    out = tmp_path / "result.json"
    run_python(str(BENCH / "train_full.py"), "--device", device, "--preset", preset, "--out", str(tmp_path / "work"),
               "--json", str(out), *argv, timeout=600)
    return json.loads(out.read_text())


def test_layout_syntax():
    assert Layout.parse("w8-ep4-cp2") == Layout(8, 4, 2)
    assert Layout.parse("w8-cp4") == Layout(8, 1, 4)
    assert Layout.parse("8") == Layout(8, 8, 1)
    assert Layout.parse("w4-ep2").name == "w4-ep2" and Layout.parse("4").name == "w4-ep4"
    assert Layout.parse("w8-ep8-cp2").dp == 4
    for bad in ("w8-ep3", "w8-cp3", "ep2", "w8-w4", "w8-tp2", "8x4"):
        with pytest.raises(argparse.ArgumentTypeError, match=bad):
            Layout.parse(bad)


def test_cpu_mode_two_layouts(tmp_path):
    res = _bench(tmp_path, "--nproc", "2", "--layouts", "w2-ep2", "w2-cp2", "--seqs", "64", "--cp-seqs", "128",
                 "--steps", "2", "--warmup", "1")
    rows = res["rows"]
    assert [(r["layout"], r["world"], r["ep"], r["cp"], r["seq"], r["layers"]) for r in rows] == [
        ("w2-ep2", 2, 2, 1, 64, 6), ("w2-cp2", 2, 1, 2, 128, 6)]  # CP layouts take the --cp-seqs
    for r in rows:
        assert r["status"] == "ok", r
        assert r["rows_per_step"] == 2 // r["cp"]  # one row per data-parallel rank
        assert r["tokens_per_step"] == r["rows_per_step"] * r["seq"]
        assert len(r["step_times"]) == 2 and len(r["losses"]) == 3
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_step"] / r["step_s"] / 2)
        assert r["flops_per_step"] > 0 and r["tflops_per_gpu"] > 0
        assert 0.05 < r["peak_gib"] < 8  # a process's peak RSS with torch loaded
        # from the seeded init the model predicts nearly uniformly over the 512 ids: each head's CE is about
        # ln 512, and the loss is the main head's plus 0.3 x the MTP layers' mean
        assert r["losses"][0] == pytest.approx(1.3 * math.log(512), abs=0.1)
    # twice the tokens a row and half the rows a step: the CP layout counts the same FLOPs but for attention
    ep, cp = rows
    assert cp["flops_per_step"] > ep["flops_per_step"]


def test_reshard_four_ranks_to_two_continues_the_curve(tmp_path):
    S = 3
    res = _bench(tmp_path, "--nproc", "4", "--layouts", "--reshard", "4:2", "--check-seq", "64", "--check-steps",
                 str(S), "--check-lr", "1e-2")
    (c,) = res["checks"]
    assert (c["from"], c["to"], c["status"]) == ("w4-ep4", "w2-ep2", "ok")
    assert c["checkpoint_files"] == [f"__{r}_0.distcp" for r in range(4)]  # every rank wrote its shards
    assert c["resumed_steps"] == list(range(S + 1, 2 * S + 1))
    ref, got = c["reference"], c["resumed"]
    assert len(ref) == 2 * S
    # the curve moves every step by far more than the tolerance: a resume from another step, without the
    # optimizer's moments or with other rows would leave it
    assert ref[-1] < ref[0] and min(abs(b - a) / a for a, b in zip(ref, ref[1:])) > 1e-3
    for a, b in zip(got, ref[S:], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    for a, b in zip(c["resumed_grad_norms"], c["reference_grad_norms"][S:], strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    assert c["ok"] and c["max_rel_diff"] <= 1e-5


@pytest.mark.gpu
def test_one_gpu_cut_runs_and_resumes(tmp_path):
    """The 1-GPU cut of the docstring at the mini preset's sizes: a timed row in bf16 autocast, then a same-layout
    resume in fp32."""
    res = _bench(tmp_path, "--nproc", "1", "--layouts", "w1", "--layers", "2", "--seqs", "2048", "--steps", "2",
                 "--warmup", "1", "--reshard", "1:1", "--check-seq", "1024", "--check-steps", "2", device="cuda",
                 preset="mini")
    (r,) = res["rows"]
    assert r["status"] == "ok", r
    assert r["device_name"] != "cpu" and 0 < r["peak_gib"] <= r["reserved_gib"]
    assert r["tflops_per_gpu"] > 1  # any H200-class GPU; mainly: the FLOP count and the timing reached the table
    (c,) = res["checks"]
    assert c["status"] == "ok" and c["checkpoint_files"] == ["__0_0.distcp"]
    for a, b in zip(c["resumed"], c["reference"][2:], strict=True):
        assert a == pytest.approx(b, rel=1e-4)
