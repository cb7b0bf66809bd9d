"""One full-size MiMo-V2-Flash decoder layer, forward + backward, mimo-flash vs transformers (GPU).

Sizes of the released model: hidden 4096, 64 heads, Q/K 192, V 128, 4 kv heads (full) / 8 (SWA),
256 experts top-8, moe_intermediate 2048. Layer 1 is the SWA variant (window 129, sink), layer 5 the
full-attention one; both have the MoE. Both implementations share the same parameter tensors
(transformers' layer is built on the meta device and handed ours), bf16, on B x T tokens.

    python bench/layer.py [--tokens 8192] [--variants swa,full] [--no-transformers] [--profile]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from common import (fmt, hardware_limits, header, layer_flops, oom_safe, table, time_ms, transformers_config,
                    transformers_state)

from mimo_flash import MiMoConfig
from mimo_flash.model.layers import rope_cos_sin
from mimo_flash.model.model import DecoderLayer, build_meta
from mimo_flash.ops.attention import allowed_mask

LAYER = {"swa": 1, "full": 5}


def init_(layer: torch.nn.Module, std: float = 0.02) -> None:
    """Random weights like MiMoForCausalLM's init; sinks and norms non-trivial."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if isinstance(p, torch.Tensor) and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("attention_sink_bias"):
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, std)


def build(config: MiMoConfig, idx: int, device: str = "cuda"):
    with torch.device(device):
        layer = DecoderLayer(config, idx)
    layer = layer.to(torch.bfloat16)  # the router stays fp32 (Router._apply)
    init_(layer)
    return layer


def transformers_layer(config: MiMoConfig, ours: torch.nn.Module, idx: int):
    """transformers' decoder layer idx holding our parameter tensors (no copy)."""
    from transformers import MiMoV2FlashForCausalLM
    tc = transformers_config(config)
    with torch.device("meta"):
        model = MiMoV2FlashForCausalLM(tc)
    layer = model.model.layers[idx]
    prefix = f"model.layers.{idx}."  # transformers' names of this layer's tensors, views of ours (no copy)
    state = transformers_state({prefix + k: v for k, v in ours.state_dict(keep_vars=True).items()}, config)
    layer.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True, assign=True)
    return layer, tc


def run_variant(config, variant, B, T, with_tf, profile_dir):
    idx = LAYER[variant]
    ours = build(config, idx)
    swa = config.is_swa(idx)
    d = config.attn_dims(swa)
    ids = torch.zeros(B, T, dtype=torch.long, device="cuda")
    meta = build_meta(ids, None, None, None)
    rope = rope_cos_sin(meta.q_pos, d["theta"], d["rotary_dim"], torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, config.hidden_size, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    dy = torch.randn(B, T, config.hidden_size, device="cuda", dtype=torch.bfloat16, generator=g)
    params = list(ours.parameters())

    def step(fn):
        def go():
            for p in params:
                p.grad = None
            x.grad = None
            fn().backward(dy)
        return go

    def ours_fn():
        h, mlp_out = ours(x, rope, meta)  # the layer's output is h + mlp_out (summed by the next layer's norm)
        return h + mlp_out

    flops = layer_flops(config, idx, B, T, train=True)
    rows = {}
    torch.cuda.reset_peak_memory_stats()
    ms = time_ms(step(ours_fn))
    rows["mimo-flash"] = (ms, torch.cuda.max_memory_allocated() / 2 ** 30)
    with torch.no_grad():
        y_ours = ours_fn().float()
        a_ours = ours.self_attn(ours.input_layernorm(x), rope, meta).float()
    if profile_dir:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step(ours_fn)()
            torch.cuda.synchronize()
        text = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        Path(profile_dir, f"profile_layer_{variant}.txt").write_text(text)
        print(text[:6000])
    diff = None
    if with_tf:
        tf_layer, tc = transformers_layer(config, ours, idx)
        mask = torch.zeros(1, 1, T, T, device="cuda", dtype=torch.bfloat16)
        mask.masked_fill_(~allowed_mask(meta, d["window"])[:1], torch.finfo(torch.bfloat16).min)

        def tf_out():
            y = tf_layer(x, attention_mask=mask, position_embeddings=rope)
            return y[0] if isinstance(y, tuple) else y

        def measure():
            torch.cuda.reset_peak_memory_stats()
            ms = time_ms(step(tf_out), warmup=1, iters=3)
            return ms, torch.cuda.max_memory_allocated() / 2 ** 30

        rows["transformers"] = oom_safe(measure)
        with torch.no_grad():
            y_tf = oom_safe(lambda: tf_out().float())
            a_tf = oom_safe(lambda: tf_layer.self_attn(hidden_states=tf_layer.input_layernorm(x), attention_mask=mask,
                                                       position_embeddings=rope)[0].float())
        if y_tf is not None and a_tf is not None:
            diff = (((a_ours - a_tf).norm() / a_tf.norm()).item(),
                    ((y_ours - y_tf).norm() / (y_tf - x.float()).norm()).item())
        rows["transformers-impl"] = f"attention {tc._attn_implementation}, experts {getattr(tc, '_experts_implementation', '?')}"
        del tf_layer
    del ours, params, x, dy
    torch.cuda.empty_cache()
    return flops, rows, diff


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--variants", default="swa,full")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--profile", action="store_true", help="write a kernel profile of ours to $OUT (or .)")
    args = ap.parse_args()
    config = MiMoConfig.preset("flash", num_hidden_layers=6)
    peak_tflops, peak_tbps = hardware_limits()
    B, T = args.batch, args.tokens // args.batch
    results = []
    notes = []
    for variant in args.variants.split(","):
        flops, rows, diff = run_variant(config, variant, B, T, not args.no_transformers,
                                        (os.environ.get("OUT", ".") if args.profile else None))
        impl = rows.pop("transformers-impl", None)
        ours_ms, ours_mem = rows["mimo-flash"]
        tf = rows.get("transformers")
        for name, r in rows.items():
            if r is None:
                results.append([variant, name, "OOM", "", "", ""])
                continue
            ms, mem = r
            ratio = tf[0] / ms if tf else None
            results.append([variant, name, fmt(ms, ".2f"), fmt(flops / ms / 1e9, ".0f"), fmt(mem, ".1f"),
                            fmt(ratio, ".2f") if name == "mimo-flash" else "1.00"])
        if impl:
            d = diff or (None, None)
            notes.append(f"{variant}: transformers ran {impl}; rel. diff vs ours (bf16): attention output "
                         f"{fmt(d[0], '.1e')}, layer output {fmt(d[1], '.1e')} (|y_ours - y_tf| / |y_tf - x|; "
                         "includes tokens whose top-8 experts flip on bf16 noise)")
        notes.append(f"{variant}: {flops / 1e12:.2f} TFLOP per fwd+bwd (layer_flops in bench/common.py); "
                     f"ours at {flops / ours_ms / 1e9 / peak_tflops * 100:.0f}% of the measured matmul peak")
    notes.insert(0, f"measured ceilings this run: bf16 matmul 8192^3 {peak_tflops:.0f} TFLOP/s, "
                    f"device copy {peak_tbps:.2f} TB/s; target >= 400 TFLOP/s")
    table(f"Full-size decoder layer, fwd+bwd, {B}x{T} tokens", header(),
          ["variant", "impl", "ms", "TFLOP/s", "peak GiB", "speed-up vs transformers"], results, notes)


if __name__ == "__main__":
    main()
