"""Prefill of the mini preset: one prompt of T tokens through the model, logits of the last position
only, mimo-flash vs transformers eager, same weights (GPU, bf16, no grad).

    python bench/prefill.py [--tokens 32768,8192,2048] [--no-transformers]
"""

from __future__ import annotations

import argparse
import time

import torch

from common import fmt, hardware_limits, header, model_flops, oom_safe, table, time_ms
from train_step import build_ours, build_transformers

from mimo_flash import MiMoConfig
from mimo_flash.model.model import build_meta


@torch.no_grad()
def prefill_ours(model, ids):
    """ids [1, T] -> logits [1, 1, V] of the last position."""
    h = model.model(ids, build_meta(ids, None, None, None))
    return model.lm_head(h[:, -1:])


@torch.no_grad()
def prefill_tf(model, ids):
    return model(input_ids=ids, logits_to_keep=1, use_cache=False).logits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="32768,8192,2048")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args()
    config = MiMoConfig.preset("mini")
    peak_tflops, peak_tbps = hardware_limits()
    lengths = [int(t) for t in args.tokens.split(",")]
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = {T: torch.randint(0, config.vocab_size, (1, T), device="cuda", generator=g) for T in lengths}
    ours = build_ours(config).eval()
    state = {k: v.detach() for k, v in ours.state_dict().items()}
    res, last = {}, {}
    notes = []
    for T, ids in inputs.items():
        res[("mimo-flash", T)] = oom_safe(lambda: time_ms(lambda: prefill_ours(ours, ids), 2, args.iters))
        last[("mimo-flash", T)] = prefill_ours(ours, ids).float()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        prefill_ours(ours, ids)  # the host's time to issue one forward: above the GPU's, the GPU waits on it
        host = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        notes.append(f"T={T}: the host issued one forward of ours in {host:.1f} ms (launch-bound where this is "
                     "close to the ms column)")
    if not args.no_transformers:
        tf, tc = build_transformers(config, state)
        tf.eval()
        for T, ids in inputs.items():
            res[("transformers", T)] = oom_safe(lambda: time_ms(lambda: prefill_tf(tf, ids), 1, 3))
            out = oom_safe(lambda: prefill_tf(tf, ids).float())
            if out is not None:
                a = last[("mimo-flash", T)]
                notes.append(f"T={T}: last-position logits rel. diff ours vs transformers "
                             f"{((a - out).norm() / out.norm()).item():.2e} (bf16)")
        notes.insert(0, f"transformers: attention {tc._attn_implementation}, experts "
                        f"{getattr(tc, '_experts_implementation', '?')}")
        del tf
    rows = []
    for T in lengths:
        flops = model_flops(config, 1, T, train=False, logits_tokens=1)
        tf_ms = res.get(("transformers", T))
        for name in ("mimo-flash", "transformers"):
            if (name, T) not in res:
                continue
            ms = res[(name, T)]
            if ms is None:
                rows.append([T, name, "OOM", "", "", ""])
                continue
            rows.append([T, name, fmt(ms, ".1f"), fmt(T / ms * 1e3, ",.0f"), fmt(flops / ms / 1e9, ".0f"),
                         fmt(tf_ms / ms, ".2f") if tf_ms and name == "mimo-flash" else ("1.00" if tf_ms else "n/a")])
    notes.insert(0, f"measured ceilings this run: bf16 matmul {peak_tflops:.0f} TFLOP/s, copy {peak_tbps:.2f} TB/s")
    table("Prefill, mini preset, one prompt", header(),
          ["tokens", "impl", "ms", "tokens/s", "TFLOP/s", "speed-up"], rows, notes)


if __name__ == "__main__":
    main()
