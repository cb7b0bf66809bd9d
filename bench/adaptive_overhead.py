"""What adaptive K costs where it decodes plainly: plain greedy decoding against num_speculative_tokens="auto" on
random weights, whose drafts are never accepted, so that the controller chooses plain steps throughout (the
batch-1 case of issue 24, where a drafting step costs 3 plain steps). Each setting warms up (graphs, compiled
steps, the controller's exploration and its runs' growth), then its decode time (CUDA events from the prefill's
last token to the end) is the median of --repeats calls; plain and auto alternate twice, so that drift shows.

    python bench/adaptive_overhead.py [--batch 1] [--prompt 256] [--new 128]
"""

from __future__ import annotations

import argparse
import collections
import statistics

import torch

from common import header, random_model
from mimo_flash import MiMoConfig
from mimo_flash.generation import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--vocab", type=int, default=8192, help="the vocabulary bench/spec.py trains the mini preset with")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda", help="cpu only to check this script (tiny sizes)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        cfg = MiMoConfig.preset(args.preset, vocab_size=args.vocab)
        dtype = torch.bfloat16
    else:
        cfg = MiMoConfig.preset("tiny")
        dtype = torch.float32
    print(header(), flush=True)
    model = random_model(cfg, dev, dtype)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), device=dev,
                        generator=torch.Generator(device=dev).manual_seed(0))

    def run(spec):
        _, stats = generate(model, ids, max_new_tokens=args.new, eos_token_id=[], num_speculative_tokens=spec,
                            return_stats=True, compile=dev.type == "cuda")
        return stats

    medians = collections.defaultdict(list)
    for name, spec in (("plain", 0), ("auto", "auto")) * 2:
        for _ in range(args.warmup):
            run(spec)
        runs = [run(spec) for _ in range(args.repeats)]
        ms = [s.decode_seconds * 1e3 for s in runs]
        ks = collections.Counter(runs[-1].spec_k) if spec else None
        medians[name].append(statistics.median(ms))
        print(f"{name}: decode ms median {medians[name][-1]:.2f} ({' '.join(f'{m:.2f}' for m in ms)})"
              + (f"; k per step of the last call: {dict(ks)}" if ks else ""), flush=True)
    ratio = [p / a for p, a in zip(medians["plain"], medians["auto"])]
    print(f"auto's speed against plain decoding: {' / '.join(f'{r:.3f}x' for r in ratio)} "
          f"(batch {args.batch}, prompt {args.prompt}, {args.new} new tokens)")


if __name__ == "__main__":
    main()
