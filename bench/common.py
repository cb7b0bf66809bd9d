"""Shared pieces of the GPU benchmarks: timing, the device's two ceilings, FLOP counts, the
transformers twin, launching a bench's workers under torchrun, and the one table each script prints."""

from __future__ import annotations

import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mimo_flash import MiMoConfig  # noqa: E402


def end_rank(ok: bool = True, code: int | None = None) -> None:
    """The end of a bench worker process that may be one rank of several: leave the process group
    (distributed.leave_distributed), flush stdout and stderr, and exit at once (status `code`, default 0, or 1
    when not ok) without the interpreter's teardown. Its results are written by then; what teardown adds is C++ destructors
    of process-group objects that Python still references, and one of those aborted a rank (SIGABRT) after it
    had reported, even past leave_distributed's barrier (CI, bench/train_full.py's EP row, once in many runs)."""
    from mimo_flash.distributed import leave_distributed

    leave_distributed(ok)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if code is not None else 0 if ok else 1)


def header() -> str:
    """One line: device, date, torch / transformers / triton versions, command."""
    try:
        import transformers
        tv = transformers.__version__
    except ImportError:
        tv = "missing"
    try:
        import triton
        trv = triton.__version__
    except ImportError:
        trv = "missing"
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python " + " ".join(sys.argv)
    return f"device: {dev}; date: {date}; torch {torch.__version__}, transformers {tv}, triton {trv}; command: {cmd}"


def time_ms(fn, warmup: int = 2, iters: int = 5) -> float:
    """Median wall time of fn() in ms, each call bracketed by CUDA events (after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def time_ms_back_to_back(fn, warmup: int = 2, iters: int = 5) -> float:
    """Mean wall time of fn() in ms over `iters` calls issued back to back (no synchronisation between
    them, as a training loop runs), bracketed by two CUDA events (after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def time_us_graphed(fn, reps: int = 20) -> float:
    """us per call of fn(): `reps` calls captured in one CUDA graph (no host launch cost), median of 5 replays."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(ts)


def hardware_limits() -> tuple[float, float]:
    """Measured here and now: bf16 matmul TFLOP/s (8192^3, random data) and device copy TB/s
    (bytes read + written, 1 GiB buffer)."""
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, warmup=3, iters=10)
    tflops = 2 * n ** 3 / ms / 1e9
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB fp32
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, iters=10)
    tbps = 2 * src.numel() * 4 / ms / 1e9
    del a, b, src, dst
    torch.cuda.empty_cache()
    return tflops, tbps


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy (median of 10)."""
    n = 1 << 30
    x = torch.randn(n // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    del x, y
    return 2 * n / sorted(ts)[len(ts) // 2]


# ----------------------------------------------------------------------------------------- FLOPs
def attention_pairs(T: int, window: int | None) -> int:
    """Query-key pairs one causal row of T tokens computes: sum_i min(i + 1, window)."""
    if window is None or window >= T:
        return T * (T + 1) // 2
    return window * (window + 1) // 2 + (T - window) * window


def attention_flops(config: MiMoConfig, swa: bool, B: int, T: int) -> tuple[float, float]:
    """One attention block of either kind on B rows of T tokens, forward: (projection matmul FLOPs, attention
    core FLOPs: QK^T and PV over the pairs the causal mask and the window allow)."""
    D = config.hidden_size
    a = config.attn_dims(swa)
    H, Hkv, Dqk, Dv = a["heads"], a["kv_heads"], a["qk_dim"], a["v_dim"]
    N = B * T
    proj = 2 * N * D * (H * Dqk + Hkv * Dqk + Hkv * Dv) + 2 * N * H * Dv * D
    return proj, 2 * B * H * attention_pairs(T, a["window"]) * (Dqk + Dv)


def layer_flops(config: MiMoConfig, idx: int, B: int, T: int, train: bool) -> float:
    """FLOPs of decoder layer idx on B rows of T tokens (multiply-add = 2).

    Matmuls: forward 2*m*n*k, training 3x that (two backward GEMMs per forward GEMM). Attention core
    (QK^T and PV over the pairs the mask allows): forward 2*pairs*(Dqk + Dv) per head, training 3.5x
    (FlashAttention's convention: the backward recomputes the scores). Elementwise work is not counted.
    """
    D = config.hidden_size
    N = B * T
    mm, attn = attention_flops(config, config.is_swa(idx), B, T)
    if config.is_moe(idx):
        mm += 2 * N * D * config.n_routed_experts  # router
        mm += 2 * N * config.num_experts_per_tok * 3 * D * config.moe_intermediate_size
    else:
        mm += 2 * N * 3 * D * config.intermediate_size
    return 3 * mm + 3.5 * attn if train else mm + attn


def mtp_layer_flops(config: MiMoConfig, B: int, T: int, train: bool) -> float:
    """One MTP layer on B rows of T tokens, its share of the shared lm_head included: eh_proj [2D -> D], a
    sliding-window attention block, a dense SwiGLU MLP, the head over all B*T positions (model/mtp.py)."""
    D, N = config.hidden_size, B * T
    mm, attn = attention_flops(config, True, B, T)
    mm += 2 * N * 2 * D * D + 2 * N * 3 * D * config.intermediate_size + 2 * N * D * config.vocab_size
    return 3 * mm + 3.5 * attn if train else mm + attn


def model_flops(config: MiMoConfig, B: int, T: int, train: bool, logits_tokens: int | None = None,
                mtp_layers: int = 0) -> float:
    """All decoder layers plus the lm_head over `logits_tokens` positions (default all B*T), plus the first
    `mtp_layers` MTP layers (mtp_layer_flops)."""
    total = sum(layer_flops(config, i, B, T, train) for i in range(config.num_hidden_layers))
    n = B * T if logits_tokens is None else logits_tokens
    head = 2 * n * config.hidden_size * config.vocab_size
    return total + (3 * head if train else head) + mtp_layers * mtp_layer_flops(config, B, T, train)


# ----------------------------------------------------------------------------------------- transformers twin
def transformers_config(config: MiMoConfig):
    """transformers' MiMoV2FlashConfig for the same model, window in keys as ours, eager attention."""
    from transformers import MiMoV2FlashConfig
    why = config.transformers_compatible()
    if why:
        raise ValueError(f"transformers cannot express this config: {why}")
    d = config.to_dict()
    for key in ("architectures", "model_type"):
        d.pop(key, None)
    tc = MiMoV2FlashConfig(**d)
    tc.sliding_window = config.sliding_window  # keys per query, as ours (5.17 defaults to 128)
    tc._attn_implementation = "eager"
    return tc


def transformers_state(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers' layout (checkpoint/names.py: q/k/v and gate/up split into views, sinks
    renamed), MTP dropped. config: the model's MiMoConfig (the q/k/v row counts)."""
    from mimo_flash.checkpoint.names import layout_parts

    out = {}
    for name, t in state.items():
        if name.startswith("model.mtp."):
            continue
        for key, idx in layout_parts(name, t.shape, "transformers", config):
            out[key] = t if idx is None else t[idx]
    return out


# ----------------------------------------------------------------------------------------- random models
def random_model(config: MiMoConfig, device, dtype: torch.dtype, fp8: bool = False):
    """Random weights made in place on the device (built on the meta device in `dtype`: no fp32 copy, which at
    8 released layers would not fit): normal(0, initializer_range) like the model's init; FP8 as the structure
    of quantize_model_ filled with random FP8 bytes and scales of that size (no bf16 copy ever exists)."""
    from mimo_flash import MiMoForCausalLM
    from mimo_flash.quant import FP8, quantize_model_

    with torch.device("meta"):
        model = MiMoForCausalLM(config).to(dtype)
    if fp8:
        quantize_model_(model)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype == FP8:
                w = torch.randn(t.shape, device=device, generator=g, dtype=torch.bfloat16).mul_(64)
                t.copy_(w.clamp_(-448, 448).to(FP8))  # e4m3fn has no infinity: out of range would be NaN
                del w
            elif name.endswith("_scale_inv"):
                t.fill_(config.initializer_range / 64)
            elif "norm" in name:
                t.fill_(1.0)
            elif name.endswith("e_score_correction_bias") or name.endswith("attention_sink_bias"):
                t.zero_()
            else:
                t.normal_(0, config.initializer_range, generator=g)
    return model.eval()


# ----------------------------------------------------------------------------------------- torchrun workers
def torchrun(script: str | Path, nproc: int, argv: list[str], device: str, timeout: float | None = None) -> int:
    """Run `python script --worker *argv` as nproc processes of this host under torch.distributed.run (its
    own free port); -> the exit status, 124 when it ran past `timeout` seconds (the launcher and every worker
    are then killed). The workers get src/ on PYTHONPATH and NVLink multicast off (NCCL NVLS, symmetric
    memory, NVSHMEM); on CPUs one OpenMP thread each. A worker that fails makes the launcher stop the others."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), "--worker", *argv]
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
           "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # its own process group: killed as one
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return 124
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def write_rank_result(out: str | Path, rank: int, result: dict) -> None:
    """A worker's results -> out/rank{rank}.json (written under a temporary name, then renamed)."""
    path = Path(out) / f"rank{rank}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)


def read_rank_results(out: str | Path) -> dict[int, dict]:
    """{rank: results} of every rank that wrote out/rank{r}.json."""
    return {int(p.stem.removeprefix("rank")): json.loads(p.read_text()) for p in Path(out).glob("rank*.json")}


# ----------------------------------------------------------------------------------------- output
def table(title: str, head: str, columns: list[str], rows: list[list], notes: list[str] = ()) -> str:
    """A markdown table with a title line, the header line and notes; printed and written to $OUT."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(columns[i]), *(len(r[i]) for r in cells)) for i in range(len(columns))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    out = [f"### {title}", head, "", line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells] + [""] + [f"- {n}" for n in notes]
    text = "\n".join(out)
    print(text, flush=True)
    if os.environ.get("OUT"):
        name = Path(sys.argv[0]).stem
        with open(Path(os.environ["OUT"]) / f"{name}_table.md", "a") as f:
            f.write(text + "\n\n")
    return text


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def oom_safe(fn):
    """fn() or None when it runs out of GPU memory (memory is released either way)."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        return None
    finally:
        torch.cuda.empty_cache()
