"""FP8 as released against bf16, side by side in one run on one GPU: the released dimensions cut to a few layers.

    python bench/fp8.py                          # 8 layers (about 105 GB in bf16, 55 GB in FP8), one H200
    python bench/fp8.py --layers 4 --skip-micro  # quicker
    python bench/fp8.py --torch-step             # also the FP8 batch-1 step with the Triton step off
    python bench/fp8.py --device cpu --tiny      # every path at tiny sizes on the CPU (a smoke test)

Per format (the bf16 model is built, measured and freed, then the FP8 one; random weights built on the device):
prefill tok/s over --prefill tokens (one sequence, last-token logits), and decode step time at batch 1 and 64
through generate() (batch 1, bf16 and FP8 alike: the Triton decode step of generation/triton_step.py, which
reads FP8 weights with their block scales; batch 64: the CUDA-graph torch step, FP8 projections through
quant/'s Triton kernels; the table says which step ran), with the bytes one step reads (weights touched: every
non-expert tensor, the expected number of distinct experts E (1 - (1 - k/E)^B), embedding rows, KV cache) and their
share of the device's copy bandwidth. Then micro-benchmarks of the quant/ backends against torch bf16.
Decode time = (time of 1 + n steps - time of 1 step) / n, so prefill and graph capture drop out.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import random_model  # noqa: E402
from mimo_flash import MiMoConfig  # noqa: E402
from mimo_flash.generation import engine, generate  # noqa: E402
from mimo_flash.options import override  # noqa: E402
from mimo_flash.ops.moe import experts as bf16_experts  # noqa: E402
from mimo_flash.quant import FP8Experts, FP8Linear, fp8_experts, fp8_linear  # noqa: E402

T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup=1, iters=3, best=False) -> float:
    """Median (best: least) seconds of fn() (synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return min(ts) if best else sorted(ts)[len(ts) // 2]


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a 1 GiB device copy (median)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * n / timed(lambda: y.copy_(x), device, 2, 10)


def step_bytes(model, B: int, kv_len: int) -> int:
    """Bytes one decode step reads at batch B: every non-expert tensor, the expected distinct experts, the
    embedding rows, and the KV cache (full layers kv_len positions, SWA layers the window)."""
    c = model.config
    E, k = c.n_routed_experts, c.num_experts_per_tok
    touched = E * (1 - (1 - k / E) ** B)
    total = B * c.hidden_size * model.lm_head.weight.element_size()
    for name, t in model.state_dict().items():
        if name == "model.embed_tokens.weight" or name.startswith("model.mtp."):
            continue
        n = t.numel() * t.element_size()
        total += n * touched / E if ".mlp.experts." in name else n
    for i in range(c.num_hidden_layers):
        d = c.attn_dims(c.is_swa(i))
        n = min(kv_len, c.sliding_window) if c.is_swa(i) else kv_len
        total += B * n * d["kv_heads"] * (d["qk_dim"] + d["v_dim"]) * model.lm_head.weight.element_size()
    return int(total)


def step_path(model, B: int) -> str:
    """Which one-token step generate() ran at batch B: "triton" (TritonStep), "graphed" (the GraphRunner's torch
    step) or "eager", with "+fallback" where the runner noted one."""
    runners = [r for r in engine._RUNNERS.get(model, {}).values() if r.cache.B == B]
    if not runners:
        return "eager"
    # (the timed calls of one and of n steps have runners of two cache lengths; the one-step call's never decodes)
    stepped = [r for r in runners if r.triton and r._triton_step is not None]
    path = "triton" if stepped else "graphed"
    return path + ("+fallback" if any(r.notes for r in runners) else "")


def time_decode(model, args, device, bw, B: int, g: torch.Generator) -> dict:
    """Decode step time at batch B through generate(): (time of 1 + n steps - time of 1 step) / n."""
    c = model.config
    prompt = torch.randint(0, c.vocab_size, (B, args.prompt), generator=g).to(device)
    run = lambda n: generate(model, prompt, max_new_tokens=n, eos_token_id=[])  # noqa: E731
    run(args.new)  # capture / compile
    t1 = timed(lambda: run(1), device, 0, 3, best=True)  # least of each: the difference is then least noisy
    tn = timed(lambda: run(args.new), device, 0, 3, best=True)
    step = (tn - t1) / (args.new - 1)
    nbytes = step_bytes(model, B, args.prompt + args.new // 2)
    path = step_path(model, B)
    log(f"  batch {B} ({path} step): {step * 1e3:.2f} ms, {B / step:.0f} tok/s, {nbytes / 1e9:.3g} GB/step, "
        f"{100 * nbytes / step / bw:.0f}% of copy bandwidth")
    return dict(step_ms=step * 1e3, tok_s=B / step, gb=nbytes / 1e9, share=nbytes / step / bw, path=path)


def measure_model(model, args, device, bw) -> dict:
    c = model.config
    g = torch.Generator().manual_seed(0)
    out = {"weights_gb": sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e9}
    ids = torch.randint(0, c.vocab_size, (1, args.prefill), generator=g).to(device)
    with torch.no_grad():
        t = timed(lambda: model(ids, logits_to_keep=1), device, 2, 7)  # (of 2 runs the median was the slower)
    out["prefill_tok_s"] = args.prefill / t
    log(f"  prefill {args.prefill} tokens: {t * 1e3:.0f} ms, {out['prefill_tok_s']:.0f} tok/s")
    del ids
    for B in args.batch:
        out[f"b{B}"] = time_decode(model, args, device, bw, B, g)
    if args.torch_step:  # batch 1 once more through the graphed torch step (new runners read decode_triton)
        engine._RUNNERS.pop(model, None)
        with override(decode_triton="off"):
            out["b1-torch"] = time_decode(model, args, device, bw, 1, g)
        engine._RUNNERS.pop(model, None)
    return out


def micro(args, device, dtype) -> list[str]:
    """quant/ backends against torch bf16 on one released projection and one layer's experts."""
    c = MiMoConfig.preset("tiny" if args.tiny else "flash")
    D = c.hidden_size
    d = c.attn_dims(False)
    N = d["heads"] * d["qk_dim"]  # q_proj rows
    lines = [f"| product | rows | bf16 ms | FP8 backend | FP8 ms | FP8/bf16 |", "|---|---|---|---|---|---|"]
    w = torch.randn(N, D, device=device, dtype=dtype) * 0.02
    lin = FP8Linear(D, N, device=device)
    lin.load_float_(w)
    cuda = device.type == "cuda"
    for M in ([1, 8, 64, 4096] if not args.tiny else [1, 8, 64, 256]):
        x = torch.randn(M, D, device=device, dtype=dtype)
        tb = timed(lambda: F.linear(x, w), device, 3, 20)
        backends = ["triton", "scaled_mm"] if cuda else ["reference"]
        for be in backends:
            try:
                tf = timed(lambda: fp8_linear(x, lin.weight, lin.weight_scale_inv, be), device, 3, 20)
            except (RuntimeError, ValueError) as e:  # a backend's shape rule: reported, the others still run
                lines.append(f"| q_proj {N}x{D} | {M} | {tb * 1e3:.3f} | {be} | failed: {str(e)[:60]} | |")
                continue
            lines.append(f"| q_proj {N}x{D} | {M} | {tb * 1e3:.3f} | {be} | {tf * 1e3:.3f} | {tf / tb:.2f} |")
    del w, lin
    E, I, k = c.n_routed_experts, c.moe_intermediate_size, c.num_experts_per_tok
    gu = torch.randn(E, 2 * I, D, device=device, dtype=dtype) * 0.02
    dn = torch.randn(E, D, I, device=device, dtype=dtype) * 0.02
    ex = FP8Experts(E, D, I, device=device)
    with torch.no_grad():
        from mimo_flash.quant.blocks import BLOCK, quantize
        for name, t in (("gate_up_proj", gu), ("down_proj", dn)):
            q, s = quantize(t, BLOCK, name)
            getattr(ex, name).copy_(q)
            getattr(ex, name + "_scale_inv").copy_(s)
    g = torch.Generator(device=device).manual_seed(0)
    from mimo_flash.quant.gemm import experts_w8a8
    for T in ([1, 64, 8192] if not args.tiny else [1, 64]):
        x = torch.randn(T, D, device=device, dtype=dtype)
        idx = torch.rand(T, E, device=device, generator=g).topk(k, -1).indices
        wts = torch.rand(T, k, device=device, generator=g)
        tb = timed(lambda: bf16_experts(x, idx, wts, gu, dn), device, 2, 10)
        fp8_args = (ex.gate_up_proj, ex.gate_up_proj_scale_inv, ex.down_proj, ex.down_proj_scale_inv)
        runs = [("triton", None), ("w8a8", None)] if cuda else [("reference", None)]
        if cuda and T >= 4096:  # tiles of the W8A8 grouped product (triton_fp8.W8A8_TILE is the default)
            runs += [("w8a8", dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=wp, num_stages=st))
                     for bm, bn, wp, st in ((128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3), (64, 256, 4, 3),
                                               (64, 128, 8, 4))]
        for be, tile in runs:
            fn = (lambda: experts_w8a8(x, idx, wts, *fp8_args, tile)) if tile else \
                (lambda: fp8_experts(x, idx, wts, *fp8_args, be))
            try:
                tf = timed(fn, device, 2, 10)
            except Exception as e:  # (a tile the compiler or the GPU refuses: reported, the others still run)
                lines.append(f"| experts {E}x({2 * I}+{I})x{D}, top-{k} | {T} | {tb * 1e3:.3f} | {be} {tile or ''} | "
                             f"failed: {str(e)[:60]} | |")
                continue
            lines.append(f"| experts {E}x({2 * I}+{I})x{D}, top-{k} | {T} | {tb * 1e3:.3f} | {be} {tile or ''} | "
                         f"{tf * 1e3:.3f} | {tf / tb:.2f} |")
    if cuda:  # each projection's grouped product alone at the largest size: bf16 torch._grouped_mm against W8A8
        from mimo_flash.ops.moe import sort_by_expert
        from mimo_flash.quant.triton_fp8 import quantize_activations_fast, w8a8_grouped_gemm
        T = 8192
        idx = torch.rand(T, E, device=device, generator=g).topk(k, -1).indices
        _, _, counts, tok, offs = sort_by_expert(idx, E)
        P = tok.numel()
        lines.append(f"\n| grouped product, {T} tokens x top-{k} = {P} rows | bf16 ms (TFLOP/s) | W8A8 ms (TFLOP/s) |")
        lines.append("|---|---|---|")
        for name, wb, q, sc in (("gate_up", gu, ex.gate_up_proj, ex.gate_up_proj_scale_inv),
                                ("down", dn, ex.down_proj, ex.down_proj_scale_inv)):
            N, K = wb.shape[1], wb.shape[2]
            a = torch.randn(P, K, device=device, dtype=dtype)
            aq, as_ = quantize_activations_fast(a)
            flop = 2 * P * N * K
            tb = timed(lambda: torch._grouped_mm(a, wb.transpose(1, 2), offs=offs), device, 3, 10)
            tf = timed(lambda: w8a8_grouped_gemm(aq, as_, q, sc, counts, dtype), device, 3, 10)
            lines.append(f"| {name} {P} x {N} x {K} | {tb * 1e3:.3f} ({flop / tb / 1e12:.0f}) | "
                         f"{tf * 1e3:.3f} ({flop / tf / 1e12:.0f}) |")
        del a, aq, as_
    if cuda:  # the activation quantizer of the W8A8 products, alone
        from mimo_flash.quant.blocks import quantize_activations
        from mimo_flash.quant.triton_fp8 import quantize_activations_fast
        x = torch.randn(8192, D, device=device, dtype=dtype)
        tq = timed(lambda: quantize_activations_fast(x), device, 3, 20)
        tt = timed(lambda: quantize_activations(x), device, 3, 20)
        gb = x.numel() * (x.element_size() + 1) / 1e9
        lines.append(f"\nactivation quantizer, 8192x{D}: Triton {tq * 1e3:.3f} ms ({gb / tq:.0f} GB/s), torch ops "
                     f"{tt * 1e3:.3f} ms")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny preset dimensions (CPU smoke test)")
    ap.add_argument("--prefill", type=int, default=8192)
    ap.add_argument("--prompt", type=int, default=256, help="decode prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="decode steps timed")
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 64],
                    help="decode batch sizes (none: prefill only)")
    ap.add_argument("--skip-micro", action="store_true")
    ap.add_argument("--torch-step", action="store_true",
                    help="also time each format's batch-1 step with the Triton step off (decode_triton='off')")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        args.prefill, args.prompt, args.new = min(args.prefill, 256), min(args.prompt, 32), min(args.new, 8)
    config = MiMoConfig.preset("tiny" if args.tiny else "flash", num_hidden_layers=args.layers,
                               num_nextn_predict_layers=0)
    log(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
        f"{args.layers} layers of the {'tiny' if args.tiny else 'released'} dimensions; the float model in {dtype}")
    bw = copy_bandwidth(device)
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    results = {}
    for name, fp8 in (("bf16", False), ("fp8", True)):
        log(f"{name}: building")
        model = random_model(config, device, dtype, fp8)
        results[name] = measure_model(model, args, device, bw)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    b, f = results["bf16"], results["fp8"]
    print(f"\n| {args.layers} layers | weights GB | prefill tok/s |" +
          "".join(f" b{B} step | b{B} step ms | b{B} tok/s | b{B} GB/step | b{B} % copy bw |" for B in args.batch))
    print("|---" * (3 + 5 * len(args.batch)) + "|")
    for name, r in results.items():
        print(f"| {name} | {r['weights_gb']:.1f} | {r['prefill_tok_s']:.0f} |" + "".join(
            f" {r[f'b{B}']['path']} | {r[f'b{B}']['step_ms']:.2f} | {r[f'b{B}']['tok_s']:.0f} | "
            f"{r[f'b{B}']['gb']:.3g} | {100 * r[f'b{B}']['share']:.0f} |" for B in args.batch))
    if args.torch_step:
        print("\n| batch 1, Triton step off | step | step ms | tok/s | % copy bw |\n|---|---|---|---|---|")
        for name, r in results.items():
            t = r["b1-torch"]
            print(f"| {name} | {t['path']} | {t['step_ms']:.2f} | {t['tok_s']:.0f} | {100 * t['share']:.0f} |")
    print(f"\nFP8 prefill speed-up: {f['prefill_tok_s'] / b['prefill_tok_s']:.3f}x (target >= 1.3x)")
    for B in args.batch:
        ratio = b[f"b{B}"]["gb"] / f[f"b{B}"]["gb"]
        speed = b[f"b{B}"]["step_ms"] / f[f"b{B}"]["step_ms"]
        print(f"batch {B}: FP8 speed-up {speed:.2f}x, byte ratio {ratio:.2f}, {100 * speed / ratio:.0f}% of it "
              f"(target >= 85%); FP8 at {100 * f[f'b{B}']['share']:.0f}% of copy bandwidth (target >= 60% at batch 1)")
    if not args.skip_micro:
        log("micro-benchmarks")
        print("\n" + "\n".join(micro(args, device, dtype)))
    log("done")


if __name__ == "__main__":
    main()
