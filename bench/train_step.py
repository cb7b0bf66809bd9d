"""A whole training step of the mini preset, mimo-flash vs transformers eager (GPU).

Step = forward with labels (next-token cross entropy) + backward + fused AdamW update + zero_grad,
bf16 weights, B x T random tokens. transformers' MiMoV2FlashForCausalLM gets the same weights
(its MTP-less twin; MTP is off on our side too, and shown separately with --mtp).

    python bench/train_step.py [--batch 4] [--seq 4096] [--mtp] [--no-transformers]
"""

from __future__ import annotations

import argparse

import torch

from common import (fmt, hardware_limits, header, model_flops, oom_safe, table, time_ms, transformers_config,
                    transformers_state)

from mimo_flash import MiMoConfig, MiMoForCausalLM


def build_ours(config: MiMoConfig) -> MiMoForCausalLM:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MiMoForCausalLM(config)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attention_sink_bias"):
                p.normal_(0.0, 1.0)
    return model.train()


def build_transformers(config: MiMoConfig, state: dict[str, torch.Tensor]):
    from transformers import MiMoV2FlashForCausalLM
    tc = transformers_config(config)
    with torch.device("cuda"):
        model = MiMoV2FlashForCausalLM(tc)
    model = model.to(torch.bfloat16)
    missing, unexpected = model.load_state_dict(transformers_state(state), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model.train(), tc


def measure(model, ids, forward, iters):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    losses = []

    def step():
        loss = forward(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    torch.cuda.reset_peak_memory_stats()
    ms = time_ms(step, warmup=2, iters=iters)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30
    del opt
    return ms, mem, losses[0].item()


def profile_step(model, ids) -> None:
    """Kernel time table of one forward + backward (no optimizer) -> $OUT/profile_train_step.txt."""
    import os
    from pathlib import Path
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    text = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    Path(os.environ.get("OUT", "."), "profile_train_step.txt").write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--mtp", action="store_true", help="also time ours with the 3 MTP layers and their loss")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--profile", action="store_true", help="write a kernel profile of one of our steps to $OUT")
    args = ap.parse_args()
    config = MiMoConfig.preset("mini")
    peak_tflops, peak_tbps = hardware_limits()
    B, T = args.batch, args.seq
    ids = torch.randint(0, config.vocab_size, (B, T), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    flops = model_flops(config, B, T, train=True)
    rows, notes = {}, []

    ours = build_ours(config)
    state = {k: v.detach().clone() for k, v in ours.state_dict().items()}  # the weights before any step
    rows["mimo-flash"] = measure(ours, ids, lambda m, x: m(x, labels=x).loss, args.iters)
    if args.profile:
        profile_step(ours, ids)
    if args.mtp:
        rows["mimo-flash + 3 MTP"] = oom_safe(lambda: measure(ours, ids, lambda m, x: m(x, labels=x, mtp=True).loss,
                                                              args.iters))
    del ours
    torch.cuda.empty_cache()
    if not args.no_transformers:
        tf, tc = build_transformers(config, state)
        del state
        rows["transformers"] = oom_safe(lambda: measure(tf, ids, lambda m, x: m(input_ids=x, labels=x).loss,
                                                        max(2, args.iters // 2)))
        notes.append(f"transformers: attention {tc._attn_implementation}, experts "
                     f"{getattr(tc, '_experts_implementation', '?')}")
        del tf
    tf_row = rows.get("transformers")
    out = []
    for name, r in rows.items():
        if r is None:
            out.append([name, "OOM", "", "", "", "", ""])
            continue
        ms, mem, loss = r
        f = flops if name != "mimo-flash + 3 MTP" else None
        out.append([name, fmt(ms, ".1f"), fmt(B * T / ms * 1e3, ",.0f"), fmt(f / ms / 1e9 if f else None, ".0f"),
                    fmt(mem, ".1f"), f"{loss:.4f}", fmt(tf_row[0] / ms, ".2f") if tf_row else "n/a"])
    notes.insert(0, f"measured ceilings this run: bf16 matmul {peak_tflops:.0f} TFLOP/s, copy {peak_tbps:.2f} TB/s; "
                    f"target >= 8x transformers eager")
    notes.append(f"{flops / 1e12:.1f} TFLOP per step (model_flops in bench/common.py: 3x forward matmuls, "
                 "3.5x attention core; optimizer and elementwise work not counted)")
    table(f"Training step, mini preset, {B}x{T} tokens", header(),
          ["impl", "ms/step", "tokens/s", "TFLOP/s", "peak GiB", "first loss", "speed-up"], out, notes)


if __name__ == "__main__":
    main()
