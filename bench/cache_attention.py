"""The attention of batched decode and verification steps over the KV cache (generation/attention.py
`cache_attention`): its torch body, traced by torch.compile as the decode graphs trace it, against the Triton kernel
(generation/attention_triton.py) at its ATTN_TILES and at the tiles of a grid, at the mini preset's shapes.

    python bench/cache_attention.py [--batch 64] [--tokens 1 2] [--position 640] [--budget-s 240]

Shapes: a full layer (4 kv heads, the cache's 832 slots, every row at about --position) and a sliding-window layer
(8 kv heads, a ring of 137 slots: the window 129 and fixed K = 1's slack), Q/K 192 and V 128 dims, 16 query heads,
--tokens new tokens a row. Each variant: 20 calls captured in a CUDA graph, the median of 5 replays, in us per call,
with the bandwidth of the keys and values it must read (the Triton kernel's: a full layer's up to each row's
position, a ring whole; the torch body reads the whole cache). The kernel's rows time it alone (`attend_splits`:
the splits' partial outputs, without the torch ops that join them); the last row of each shape is the whole
backend with the best tiles, traced like the body. Random bf16 data. GPU only. The last line: the tiles of least
kernel time over the shapes, each counted as often as a mini step calls it (LAYERS), to be set in ATTN_TILES by
hand."""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import header, time_us_graphed  # noqa: E402
from mimo_flash.generation.attention import cache_attention  # noqa: E402
from mimo_flash.generation.attention_triton import ATTN_TILES, attend_splits, cache_attention_triton  # noqa: E402
from mimo_flash.ops.attention import AttnMeta  # noqa: E402
from mimo_flash.options import override  # noqa: E402

H, DQK, DV = 16, 192, 128
LAYERS = dict(full=3, swa=10)  # calls a step of the mini preset makes (its SWA layers and the MTP layer: 10)


def grid() -> list[dict]:  # (min_programs 0: each split length as given)
    return [dict(split_d=sd, BLOCK_N=bn, SPLIT_KEYS=sk, warps=w, stages=st, min_programs=0) for sd in (False, True)
            for bn in (32, 64, 128) for sk in (128, 512) for w in (4, 8) for st in (2, 3, 4)]


def shape(name: str, B: int, Tq: int, position: int, g):
    """(q, k, v, meta, window, sink, bytes the kernel reads) of one layer kind."""
    dev, dt = "cuda", torch.bfloat16
    full = name == "full"
    hkv, S = (4, 832) if full else (8, 137)
    last = position + torch.randint(-8, 8, (B,), generator=g, device=dev)  # each row's last new position
    q_pos = last[:, None] - Tq + 1 + torch.arange(Tq, device=dev)[None]
    if full:
        k_pos = torch.arange(S, device=dev).expand(B, S).contiguous()
        seen = int(last.max()) + 1
    else:  # the ring: the last S positions of each row, slot p % S
        slots = torch.arange(S, device=dev)
        k_pos = last[:, None] - ((last[:, None] - slots[None]) % S)
        seen = S
    meta = AttnMeta(q_pos=q_pos, k_pos=k_pos, q_seg=torch.zeros_like(q_pos), k_seg=torch.zeros_like(k_pos),
                    aligned=False, plain=False)
    q = torch.randn(B, H, Tq, DQK, generator=g, device=dev).to(dt)
    k = torch.randn(B, hkv, S, DQK, generator=g, device=dev).to(dt)
    v = torch.randn(B, hkv, S, DV, generator=g, device=dev).to(dt)
    sink = torch.randn(H, generator=g, device=dev)
    return q, k, v, meta, None if full else 129, sink, B * hkv * seen * (DQK + DV) * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--position", type=int, default=640)
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="tiles are timed for at most this long in all (shared equally by the shapes)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/cache_attention.py times CUDA kernels: it needs a GPU")
    print(header(), flush=True)
    shapes = list(itertools.product(args.tokens, ("full", "swa")))
    totals = {}  # tiles -> [tiles, kernel us summed over the shapes (times LAYERS), shapes timed]
    g = torch.Generator(device="cuda").manual_seed(0)
    scale = DQK ** -0.5
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for Tq, name in shapes:
        t_end = time.perf_counter() + args.budget_s / len(shapes)
        q, k, v, meta, window, sink, nbytes = shape(name, args.batch, Tq, args.position, g)
        cache_bytes = k.numel() * 2 + v.numel() * 2
        want = cache_attention(q.double(), k.double(), v.double(), meta, scale, window, sink.double())

        def traced(mode, tiles=None):
            torch._dynamo.reset()
            if mode == "torch":
                fn = torch.compile(lambda: cache_attention(q, k, v, meta, scale, window, sink), fullgraph=True)
                with override(cache_attention="torch"):
                    out = fn()
                    return time_us_graphed(fn), out
            fn = torch.compile(lambda: cache_attention_triton(q, k, v, meta.q_pos, meta.q_seg, meta.k_pos,
                                                              meta.k_seg, scale, window, sink, tiles),
                               fullgraph=True)
            out = fn()
            return time_us_graphed(fn), out

        def err(out):
            return float((out.double() - want).norm() / want.norm())

        us, out = traced("torch")
        print(f"batch {args.batch}, {Tq} token(s) a row, {name} layer ({nbytes / 1e6:.1f} MB the kernel reads, "
              f"{cache_bytes / 1e6:.1f} MB of cache):", flush=True)
        print(f"  torch body, compiled: {us:7.1f} us ({cache_bytes / us / 1e6:.2f} TB/s of the cache; error "
              f"{err(out):.1e})", flush=True)
        rows = []
        for tiles in [{}] + grid():
            if tiles and time.perf_counter() > t_end:
                print(f"  (budget spent: {len(rows)} tiles timed)")
                break
            try:
                t = time_us_graphed(lambda: attend_splits(q, k, v, meta.q_pos, meta.q_seg, meta.k_pos, meta.k_seg,
                                                          scale, window, tiles))
            except Exception as e:  # (tiles past the GPU's shared memory or registers)
                print(f"  {tiles}: {type(e).__name__}")
                continue
            rows.append((t, tiles))
        rows.sort(key=lambda r: r[0])
        for t, tiles in rows:
            total = totals.setdefault(repr(tiles), [tiles, 0.0, 0])
            total[1:] = [total[1] + LAYERS[name] * t, total[2] + 1]
        default = next(t for t, tiles in rows if not tiles)
        print(f"  kernel alone at ATTN_TILES {ATTN_TILES}: {default:.1f} us ({nbytes / default / 1e6:.2f} TB/s); "
              f"best:", flush=True)
        for t, tiles in rows[:5]:
            print(f"    {t:7.1f} us {nbytes / t / 1e6:5.2f} TB/s {tiles or 'ATTN_TILES'}", flush=True)
        for label, tiles in (("ATTN_TILES", {}), ("best tiles", rows[0][1])):
            us, out = traced("triton", tiles)
            print(f"  Triton backend, compiled, {label}: {us:7.1f} us (error {err(out):.1e})", flush=True)
    full = [v for v in totals.values() if v[2] == len(shapes)]
    tiles, us, _ = min(full, key=lambda v: v[1])
    print(f"best kernel tiles over the {len(shapes)} shapes, each counted as often as a step calls it ({LAYERS}): "
          f"{tiles or 'ATTN_TILES'} ({us:.1f} us in all, ATTN_TILES {totals[repr({})][1]:.1f})")


if __name__ == "__main__":
    main()
