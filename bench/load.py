"""Checkpoint loading speed and memory on a synthetic checkpoint of several GB (CPU).

    python bench/load.py [--size-gb 4] [--dir /tmp] [--formats fp8,bf16] [--keep]

For each format it writes a release-format synthetic checkpoint (FP8: q/k/v and SwiGLU projections in
float8_e4m3fn with 128x128 block scales; bf16: everything unquantized), evicts it from the page cache
(cold read; posix_fadvise DONTNEED), then loads it into a bf16 model in a fresh process, twice: cold
and warm (page cache hot). Reported: checkpoint GB read, model GB, seconds, GB/s of checkpoint read and
of model filled, peak RSS and its excess over the process before the load. The checkpoint is deleted
at the end unless --keep. Free disk space and memory are checked first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from mimo_flash import MiMoConfig, MiMoForCausalLM  # noqa: E402
from mimo_flash.checkpoint import write_synthetic_checkpoint  # noqa: E402
from mimo_flash.checkpoint.names import is_fp32, is_quantized, to_hub  # noqa: E402

GB = 1e9

CHILD = r"""
import json, sys, time
import torch
from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.checkpoint import load_pretrained

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

with torch.device("meta"):
    MiMoForCausalLM(MiMoConfig.preset("tiny"))  # lazy imports of the model code, outside the measurement
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS
except OSError:
    pass
base = status("VmRSS")
t0 = time.perf_counter()
model = load_pretrained(sys.argv[1], dtype=torch.bfloat16, progress=False)
seconds = time.perf_counter() - t0
sizes = [t.numel() * t.element_size() for t in model.state_dict().values()]
print(json.dumps({"seconds": seconds, "base": base, "peak": status("VmHWM"), "model": sum(sizes),
                  "largest": max(sizes)}))
"""


def bench_config(size_gb: float) -> MiMoConfig:
    """The mini preset with wider experts, and as many experts (a multiple of 8) as make ~size_gb of FP8."""
    base = dict(moe_intermediate_size=768)
    per_expert = 3 * 768 * 1024 * 11  # bytes in FP8 over the 11 MoE layers
    fixed = fp8_bytes(MiMoConfig.preset("mini", n_routed_experts=8, **base)) - 8 * per_expert
    experts = max(8, int(round((size_gb * GB - fixed) / per_expert / 8)) * 8)
    return MiMoConfig.preset("mini", n_routed_experts=experts, **base)


def fp8_bytes(config: MiMoConfig) -> int:
    with torch.device("meta"):
        state = MiMoForCausalLM(config).state_dict()
    total = 0
    for k, t in to_hub(state, config):
        n = t.numel()
        total += n * (1 if is_quantized(k) else 4 if is_fp32(k) else 2)
    return total


def evict(path: Path) -> None:
    """Drop the checkpoint's pages from the OS page cache (they are clean: written and fsynced)."""
    for f in path.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load_in_child(path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"load failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, torch {torch.__version__}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=4.0, help="FP8 checkpoint size to aim for (GB)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the checkpoint")
    ap.add_argument("--formats", default="fp8,bf16", help="comma-separated: fp8, bf16")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # so that the checkpoint is cleaned up

    config = bench_config(args.size_gb)
    fp8_size = fp8_bytes(config)
    with torch.device("meta"):
        model_bytes = sum(t.numel() * (4 if is_fp32(k) else 2) for k, t in to_hub(MiMoForCausalLM(config).state_dict(), config))
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    need_disk = max(fp8_size if f == "fp8" else model_bytes for f in formats) * 1.1 + 1 * GB
    free = shutil.disk_usage(args.dir).free
    print(f"config: mini preset, {config.n_routed_experts} experts x moe_intermediate_size "
          f"{config.moe_intermediate_size}; FP8 checkpoint {fp8_size / GB:.2f} GB, bf16 model {model_bytes / GB:.2f} GB")
    print(f"free disk in {args.dir}: {free / GB:.1f} GB (need {need_disk / GB:.1f})")
    if free < need_disk:
        sys.exit("not enough free disk space; use --dir or a smaller --size-gb")
    avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if model_bytes * 1.3 > avail:
        sys.exit(f"not enough free memory ({avail / GB:.1f} GB) for a {model_bytes / GB:.1f} GB model")

    rows = []
    for fmt in formats:
        path = Path(tempfile.mkdtemp(dir=args.dir, prefix=f"mimo-load-bench-{fmt}-"))
        try:
            t0 = time.perf_counter()
            s = write_synthetic_checkpoint(path / "ck", config, fp8=(fmt == "fp8"), max_shard_size="2GB")
            wrote = time.perf_counter() - t0
            print(f"{fmt}: wrote {s['bytes'] / GB:.2f} GB in {s['shards']} shards, {wrote:.1f} s")
            for cache in ("cold", "warm"):
                if cache == "cold":
                    evict(path / "ck")
                r = load_in_child(path / "ck")
                row = {"format": fmt, "cache": cache, "ckpt_gb": s["bytes"] / GB, "model_gb": r["model"] / GB,
                       "seconds": r["seconds"], "read_gbps": s["bytes"] / GB / r["seconds"],
                       "fill_gbps": r["model"] / GB / r["seconds"], "peak_rss_gb": r["peak"] / GB,
                       "extra_gb": (r["peak"] - r["base"]) / GB, "largest_gb": r["largest"] / GB}
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
        finally:
            if args.keep:
                print(f"kept {path}")
            else:
                shutil.rmtree(path, ignore_errors=True)

    print(f"\nmachine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    print("| checkpoint | page cache | checkpoint GB | model GB (bf16) | load s | read GB/s | fill GB/s | "
          "peak RSS GB | RSS over start GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['cache']} | {r['ckpt_gb']:.2f} | {r['model_gb']:.2f} | {r['seconds']:.1f} | "
              f"{r['read_gbps']:.2f} | {r['fill_gbps']:.2f} | {r['peak_rss_gb']:.2f} | {r['extra_gb']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
