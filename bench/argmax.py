"""The greedy token of a decode batch: torch.argmax over the vocabulary against the two-pass argmax of
generation/sampling.py (the maximum of each of `parts` slices, then the first slice holding the largest), eager
and compiled by torch.compile as a decode step's glue is, timed in a CUDA graph (bench/common.py's
time_us_graphed). Checks each variant's index against torch.argmax on logits with ties first.

    python bench/argmax.py [--rows 64 128] [--vocab 32000 152576]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import time_us_graphed  # noqa: E402
from mimo_flash.generation.sampling import argmax  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 152576])
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "| us per call (CUDA graph of 20 calls, median of 5 replays)")
    print("rows x vocab, dtype, mode | torch.argmax | two passes, parts: us")
    for V in args.vocab:
        candidates = [p for p in (16, 32, 64, 128) if V % p == 0 and V // p >= 128]
        for B in args.rows:
            for dt in (torch.bfloat16,):  # the logits' dtype in a bf16 model
                x = torch.randn(B, V, device="cuda").to(dt)
                x[:, V // 3] = x[:, 2 * V // 3] = x.max() + 1  # equal maxima: the first wins
                want = x.argmax(-1)
                for mode, wrap in (("eager", lambda f: f), ("compiled", torch.compile)):
                    one = wrap(lambda t: t.argmax(-1))
                    cells = [f"{time_us_graphed(lambda: one(x)):.1f}"]
                    for p in candidates:
                        two = wrap(lambda t, p=p: argmax(t, p))
                        assert torch.equal(two(x), want), (B, V, dt, mode, p)
                        cells.append(f"{p}: {time_us_graphed(lambda: two(x)):.1f}")
                    print(f"{B} x {V}, {str(dt)[6:]}, {mode} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
