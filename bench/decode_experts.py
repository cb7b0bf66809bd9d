"""The routed experts of batched decode and verification steps (ops/moe.py `experts_decode`), one backend of
options().decode_experts against another, at the token counts those steps give (batch x tokens a row).

    python bench/decode_experts.py [--preset mini] [--tokens 16 32 64 128 256] [--modes dense fused grouped_mm triton]
    python bench/decode_experts.py --sweep [fused|routed] [--tokens 128 64 32] [--budget-s 300]
    python bench/decode_experts.py --skew 1.0 ...  # uneven expert loads, as a trained router gives

Each backend is traced by torch.compile (fullgraph, as the decode graphs trace it) at each token count; 20 calls
captured in one CUDA graph, the median of 5 replays, in us per call, with the bandwidth of the experts' weights
(all of them are read once more than E/2 token-expert pairs, the range this covers) and the relative error against
fp64. Random bf16 weights and routing (distinct experts a token): uniform, or with --skew a > 0 each token draws its
experts without replacement with probability proportional to (rank + 1) ** -a (a fixed random ranking of the experts):
uneven loads, as in a trained model, where some experts get several times the mean pairs. GPU only.

--sweep times a backend's gate/up and down kernels over a grid of tiles at the first token count, each against two
copies of its weights in turn (so that no call finds them in L2), then the best few again at the other counts, and
prints each kernel's best tiles against the defaults (to be set by hand in ops/kernels/decode_experts.py):
"fused" (the flag's default) dense_gate_up and dense_down apart, against DENSE_TILES; "routed" the whole routed_experts
call with one kernel's tiles changed at a time (its list kernel and the other product included), against
ROUTED_TILES."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import header, time_us_graphed  # noqa: E402
from mimo_flash import MiMoConfig  # noqa: E402
from mimo_flash.ops.kernels.decode_experts import (DENSE_TILES, ROUTED_TILES, dense_down, dense_gate_up,  # noqa: E402
                                                  routed_experts)
from mimo_flash.ops.moe import DECODE_EXPERTS, experts_decode, experts_reference  # noqa: E402
from mimo_flash.options import override  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--modes", nargs="+", default=list(DECODE_EXPERTS), choices=list(DECODE_EXPERTS))
    ap.add_argument("--sweep", nargs="?", const="fused", choices=["fused", "routed"],
                    help="time a backend's kernels' tiles (see above)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="--sweep stops starting tiles after this long")
    ap.add_argument("--skew", type=float, default=0.0, help="uneven expert loads (see above); 0: uniform")
    args = ap.parse_args()
    if args.skew < 0:
        ap.error(f"--skew must be >= 0, got {args.skew}")
    if not torch.cuda.is_available():
        raise SystemExit("bench/decode_experts.py times CUDA kernels: it needs a GPU")
    cfg = MiMoConfig.preset(args.preset)
    D, I, E, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    g = torch.Generator(device="cuda").manual_seed(0)
    gate_up = (torch.randn(E, 2 * I, D, generator=g, device="cuda") * D ** -0.5).bfloat16()
    down = (torch.randn(E, D, I, generator=g, device="cuda") * I ** -0.5).bfloat16()
    nbytes = (gate_up.numel() + down.numel()) * 2
    print(header(), flush=True)
    print(f"{args.preset}: {E} experts of {D} x {I}, top {k}; {nbytes / 1e6:.0f} MB of expert weights a layer; "
          f"routing {'uniform' if not args.skew else f'skewed (a = {args.skew})'}")
    if args.sweep:
        return sweep(args, gate_up, down, k, g)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(args.tokens))
    print("| tokens | " + " | ".join(f"{m} us (TB/s, error)" for m in args.modes) + " |")
    print("|---" * (len(args.modes) + 1) + "|")
    for N in args.tokens:
        if 2 * N * k <= E:
            print(f"| {N} | " + " | ".join("gather path (N * k <= E / 2)" for _ in args.modes) + " |")
            continue
        x = torch.randn(N, D, generator=g, device="cuda").bfloat16()
        idx = routing(N, E, k, args.skew, g)
        w = torch.rand(N, k, generator=g, device="cuda")
        load = torch.bincount(idx.reshape(-1), minlength=E)
        print(f"N {N}: pairs an expert, mean {N * k / E:.1f}, max {int(load.max())}, experts unused "
              f"{int((load == 0).sum())}", flush=True)
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


def routing(N: int, E: int, k: int, skew: float, g) -> torch.Tensor:
    """[N, k] distinct experts a token: uniform (skew 0), else drawn without replacement with probability
    proportional to (rank + 1) ** -skew over one fixed random ranking of the experts."""
    dev = g.device
    if not skew:
        return torch.stack([torch.randperm(E, generator=g, device=dev)[:k] for _ in range(N)])
    rank = torch.randperm(E, generator=torch.Generator(device=dev).manual_seed(1), device=dev)
    p = (rank + 1.0) ** -skew
    return torch.multinomial(p.expand(N, E).contiguous(), k, replacement=False, generator=g)


def _grid(name: str, N: int, routed: bool) -> list[dict]:
    """The tiles --sweep tries for one kernel at N tokens (combinations that do not fit a GPU fail and are skipped)."""
    if routed:
        if name == "gate_up":
            return [dict(BI=bi, BK=bk, BM=bm, warps=w, stages=st) for bi in (32, 64, 128) for bk in (64, 128)
                    for bm in (None, 16, 32, 64) for w in (4, 8) for st in (3,)]
        return [dict(BD=bd, BK=bk, BM=bm, warps=w, stages=st) for bd in (64, 128, 256) for bk in (64, 128)
                for bm in (None, 16, 32, 64) for w in (4, 8) for st in (3,)]
    rows = [None, 64] if N > 64 else [None]
    if name == "gate_up":
        return [dict(BI=bi, BK=bk, BM=bm, warps=w, stages=st) for bi in (32, 64, 128) for bk in (64, 128)
                for bm in rows for w in (4, 8) for st in (3, 5)]
    return [dict(BD=bd, BK=bk, SPLITS=sp, BM=bm, warps=w, stages=st) for bd in (32, 64, 128) for bk in (64, 128)
            for sp in (8, 16) for bm in rows for w in (4, 8) for st in (3, 5)]


def sweep(args, gate_up, down, k: int, g) -> None:
    import time

    E, _, D = gate_up.shape
    routed = args.sweep == "routed"
    table, defaults = ("ROUTED_TILES", ROUTED_TILES) if routed else ("DENSE_TILES", DENSE_TILES)
    t_end = time.perf_counter() + args.budget_s
    weights = {"gate_up": [gate_up, gate_up.clone()], "down": [down, down.clone()]}
    best, totals = {}, {}  # totals: per kernel, tile -> [tile, us summed over the token counts, counts timed]
    for n_i, N in enumerate(args.tokens):
        x = torch.randn(N, D, generator=g, device="cuda").bfloat16()
        idx = routing(N, E, k, args.skew, g)
        wt = torch.rand(N, k, generator=g, device="cuda")
        wd = torch.zeros(N, E, device="cuda").scatter(1, idx, wt)
        if routed:
            calls = {"gate_up": lambda w, t: routed_experts(x, idx, wt, w, down, {"gate_up": t}),
                     "down": lambda w, t: routed_experts(x, idx, wt, gate_up, w, {"down": t})}
        else:
            a = dense_gate_up(x, wd, gate_up)
            calls = {"gate_up": lambda w, t: dense_gate_up(x, wd, w, t),
                     "down": lambda w, t: dense_down(a, wd, w, t)}
        for name, call in calls.items():
            nbytes = weights[name][0].numel() * 2

            def timed(tiles):
                rows = []
                for tile in tiles:
                    if tile and time.perf_counter() > t_end:
                        print(f"  (budget spent: {len(rows)} of {len(tiles)} tiles timed)")
                        break
                    flip = iter(range(1 << 30))
                    try:
                        us = time_us_graphed(lambda: call(weights[name][next(flip) % 2], tile))
                    except Exception as e:  # (tiles past the GPU's shared memory or registers)
                        print(f"  {name} {tile}: {type(e).__name__}")
                        continue
                    rows.append((us, tile))
                return rows

            if n_i == 0:
                rows = sorted(timed([{}] + _grid(name, N, routed)), key=lambda r: r[0])
                best[name] = [r for r in rows if r[1]]
            else:
                rows = sorted(timed([{}] + [t for _, t in best[name][:6]]), key=lambda r: r[0])
            for us, tile in rows:
                totals.setdefault(name, {}).setdefault(repr(tile), [tile, 0.0, 0])
                totals[name][repr(tile)][1:] = [totals[name][repr(tile)][1] + us, totals[name][repr(tile)][2] + 1]
            default = next(us for us, t in rows if not t)
            print(f"N {N} {name} ({nbytes / 1e6:.0f} MB; {table} {defaults[name]}): default {default:.1f} us "
                  f"({nbytes / default / 1e6:.2f} TB/s); best:", flush=True)
            for us, tile in rows[:6]:
                print(f"    {us:7.1f} us {nbytes / us / 1e6:5.2f} TB/s {tile or 'default'}", flush=True)
    for name, per in totals.items():  # the tile with the least time over every token count (timed at all of them)
        full = [v for v in per.values() if v[2] == len(args.tokens)]
        tile, us, _ = min(full, key=lambda v: v[1])
        print(f"best {name} over {args.tokens} tokens: {tile or 'default'} ({us:.1f} us in all, default "
              f"{per[repr({})][1]:.1f})")

if __name__ == "__main__":
    main()
