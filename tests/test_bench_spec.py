"""bench/spec.py end to end on the CPU at tiny sizes (slow: it trains for 12 s and decodes 20 settings)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_spec_runs_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "spec.py"), "--device", "cpu", "--train-minutes", "0.2",
                        "--batches", "1", "2", "--new-tokens", "16", "--budget-minutes", "30",
                        "--repeats", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| batch")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in rows]
    assert len(cells) == 2 * 2 * 5 + 2  # batches x modes x (plain, K = 1, 2, 3, auto), and greedy plain eager
    assert {(c[0], c[1], c[2]) for c in cells} == {(b, m, k) for b in ("1", "2") for m in ("greedy", "sampled")
                                                  for k in ("0", "1", "2", "3", "auto")} | {("1", "greedy", "0 eager"),
                                                                                           ("2", "greedy", "0 eager")}
    for c in cells:
        if c[1] == "greedy":
            assert c[11] == "1.00" and c[12] == "16", c  # every row's tokens equal plain greedy's
        if c[2] in ("1", "2", "3"):
            assert 1.0 <= float(c[3]) <= int(c[2]) + 1, c  # acceptance length within [1, K + 1]
            assert 0.0 < float(c[4]) <= 1.0 and (c[0] != "1" or c[4] == "1.00"), c  # busy: one row is always busy
        else:
            assert c[4] == "" if c[2] != "auto" else c[4] == "" or 0.0 < float(c[4]) <= 1.0, c
    assert "runner fallbacks: none" in r.stdout  # (the CPU runs the graph-shaped steps directly: nothing to fail)
    assert (tmp_path / "checkpoint" / "config.json").exists()
    # --reuse: the same trained model measured again, here with another option for the decoding, without training
    again = subprocess.run([sys.executable, str(ROOT / "bench" / "spec.py"), "--device", "cpu", "--reuse", str(tmp_path),
                            "--batches", "1", "--new-tokens", "8", "--budget-minutes", "30", "--ks", "auto", "--no-eager",
                            "--option", 'decode_experts="grouped_mm"', "--profile", "--out", str(tmp_path / "again")],
                           capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "first steps (compilation" in r.stdout and "first steps (compilation" not in again.stdout  # no training
    assert 'options: decode_experts="grouped_mm"; model trained by an earlier run' in again.stdout
    ks = [line.strip("|").split("|")[2].strip() for line in again.stdout.splitlines()
          if line.startswith("| 1 ")]  # --ks auto: plain and adaptive only, greedy and sampled; no eager row
    assert sorted(ks) == ["0", "0", "auto", "auto"], ks
    # --profile: two profiled calls per setting, a line in the log and the decode's ops per step in --out
    for name in ("b1_greedy_k0", "b1_sampled_k0", "b1_greedy_kauto", "b1_sampled_kauto"):
        table = (tmp_path / "again" / f"profile_{name}.txt").read_text().splitlines()
        assert "steps (a call of" in table[0] and "(all)" in table[1], (name, table[:2])
        assert any(line.split()[2].startswith("aten::") for line in table[2:]), name
    profiled = [line for line in again.stdout.splitlines() if ", profiled: decode " in line]
    assert len(profiled) == 4 and all("device time n/a (no CUDA)" in line for line in profiled), profiled
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "spec.py"), "--device", "cpu", "--reuse",
                          str(tmp_path / "nothing")], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "holds no trained run" in bad.stderr
