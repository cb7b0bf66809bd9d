"""The routed experts of batched decode and verification steps (ops/moe.py `experts_decode`), one backend of
options().decode_experts against another, at the token counts those steps give (batch x tokens a row).

    python bench/decode_experts.py [--preset mini] [--tokens 16 32 64 128 256] [--modes dense fused grouped_mm triton]

Each backend is traced by torch.compile (fullgraph, as the decode graphs trace it) at each token count; 20 calls
captured in one CUDA graph, the median of 5 replays, in us per call, with the bandwidth of the experts' weights
(all of them are read once more than E/2 token-expert pairs, the range this covers) and the relative error against
fp64. Random bf16 weights and routing (distinct experts a token). GPU only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import header, time_us_graphed  # noqa: E402
from mimo_flash import MiMoConfig  # noqa: E402
from mimo_flash.ops.moe import DECODE_EXPERTS, experts_decode, experts_reference  # noqa: E402
from mimo_flash.options import override  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--modes", nargs="+", default=list(DECODE_EXPERTS), choices=list(DECODE_EXPERTS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/decode_experts.py times CUDA kernels: it needs a GPU")
    cfg = MiMoConfig.preset(args.preset)
    D, I, E, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    g = torch.Generator(device="cuda").manual_seed(0)
    gate_up = (torch.randn(E, 2 * I, D, generator=g, device="cuda") * D ** -0.5).bfloat16()
    down = (torch.randn(E, D, I, generator=g, device="cuda") * I ** -0.5).bfloat16()
    nbytes = (gate_up.numel() + down.numel()) * 2
    print(header(), flush=True)
    print(f"{args.preset}: {E} experts of {D} x {I}, top {k}; {nbytes / 1e6:.0f} MB of expert weights a layer")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(args.tokens))
    print("| tokens | " + " | ".join(f"{m} us (TB/s, error)" for m in args.modes) + " |")
    print("|---" * (len(args.modes) + 1) + "|")
    for N in args.tokens:
        if 2 * N * k <= E:
            print(f"| {N} | " + " | ".join("gather path (N * k <= E / 2)" for _ in args.modes) + " |")
            continue
        x = torch.randn(N, D, generator=g, device="cuda").bfloat16()
        idx = torch.stack([torch.randperm(E, generator=g, device="cuda")[:k] for _ in range(N)])
        w = torch.rand(N, k, generator=g, device="cuda")
        want = experts_reference(x.double(), idx, w.double(), gate_up.double(), down.double())
        cells = []
        for mode in args.modes:
            with override(decode_experts=mode):
                torch._dynamo.reset()
                fn = torch.compile(experts_decode, fullgraph=True, dynamic=False)
                try:
                    out = fn(x, idx, w, gate_up, down)
                    us = time_us_graphed(lambda: fn(x, idx, w, gate_up, down))
                except Exception as e:  # a backend that does not run here: say so, time the others
                    cells.append(f"failed: {type(e).__name__}")
                    continue
            err = float((out.double() - want).norm() / want.norm())
            cells.append(f"{us:.1f} ({nbytes / us / 1e6:.2f}, {err:.1e})")
        print(f"| {N} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
