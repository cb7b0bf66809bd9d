"""`mimo-flash convert SRC DST [--dtype bf16|fp32] [--fp8] [--no-mtp] [--layout hub|transformers]`."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a checkpoint: hub (FP8 or not) / transformers' fused layout -> hub, bf16/fp32/FP8",
        description="Convert a MiMo-V2-Flash checkpoint tensor by tensor (one tensor in memory at a time). "
                    "Reads the hub format (FP8 or not), transformers' fused-expert layout, or pickle files "
                    "with --allow-pickle; writes the hub format (or --layout transformers) into DST atomically, "
                    "with tokenizer and other non-weight files of SRC copied along. SRC may also be a training "
                    "checkpoint's step directory (RUN/checkpoints/step-N, torch.distributed.checkpoint).")
    p.add_argument("src", help="checkpoint directory (or a .safetensors / .index.json file beside config.json)")
    p.add_argument("dst", help="output directory (replaced atomically; its non-checkpoint files are kept)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="dtype of the unquantized tensors "
                   "(default: keep each tensor's; FP8 sources dequantize to the config's torch_dtype)")
    p.add_argument("--fp8", action="store_true", help="store the tensors the release quantizes in FP8 "
                   "with per-block scales (exact copy when SRC is FP8 already)")
    p.add_argument("--no-mtp", action="store_true", help="drop the multi-token-prediction layers")
    p.add_argument("--layout", choices=("hub", "transformers"), default="hub",
                   help="tensor names: the release's (default) or transformers' fused experts")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard (default 5GB)")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt files (loaded weights_only)")
    p.add_argument("--non-strict", action="store_true", help="ignore unexpected tensors instead of failing")
    p.set_defaults(fn=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from ..cli import UserError
    from .save import convert_checkpoint

    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        raise UserError(f"{src}: no such file or directory")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst}: exists and is not a directory")

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"mimo-flash convert: warning: {message}", file=sys.stderr)

    if (src / ".metadata").exists():  # a training checkpoint (torch.distributed.checkpoint) step directory
        from ..training.dcp import export_step

        if args.no_mtp or args.layout != "hub" or args.allow_pickle or args.non_strict:
            raise UserError("a training checkpoint converts to the hub layout only (with --dtype, --fp8, "
                            "--max-shard-size)")
        summary = export_step(src, dst, dtype=args.dtype, fp8=args.fp8, max_shard_size=args.max_shard_size)
        print(f"wrote {dst}: {summary['tensors']} tensors, {summary['bytes'] / 1e9:.3f} GB in {summary['shards']} "
              "shard(s)")
        return 0
    with warnings.catch_warnings():
        warnings.showwarning = show
        summary = convert_checkpoint(src, dst, dtype=args.dtype, fp8=args.fp8, load_mtp=not args.no_mtp,
                                     layout=args.layout, max_shard_size=args.max_shard_size,
                                     allow_pickle=args.allow_pickle, strict=not args.non_strict)
    print(f"wrote {summary['path']}: {summary['tensors']} tensors, {summary['bytes'] / 1e9:.3f} GB "
          f"in {summary['shards']} shard(s)")
    return 0
