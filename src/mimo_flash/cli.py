"""The `mimo-flash` command line.

Each part of the package that has commands provides a `commands` module with `register(subparsers)`;
a subcommand's handler takes the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

COMMAND_MODULES = (
    "mimo_flash.checkpoint.commands",   # convert
    "mimo_flash.generation.commands",   # generate, chat
    "mimo_flash.training.commands",     # train (and the demo, once training lands)
    "mimo_flash.serving.commands",      # serve
)


class UserError(Exception):
    """Bad input from the user: printed as one line, no traceback."""


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the tiny preset, save it in hub format, reload it and check the logits agree."""
    import tempfile
    from pathlib import Path

    import torch

    from . import MiMoConfig, MiMoForCausalLM

    torch.manual_seed(0)
    config = MiMoConfig.preset("tiny")
    model = MiMoForCausalLM(config).eval()
    print(f"tiny MiMo-V2-Flash: {model.num_parameters():,} parameters "
          f"({model.num_parameters(active=True):,} active), {config.num_hidden_layers} layers "
          f"(pattern {config.hybrid_layer_pattern}), {config.n_routed_experts} experts top-"
          f"{config.num_experts_per_tok}, {config.num_nextn_predict_layers} MTP layers")
    out = Path(args.out or tempfile.mkdtemp(prefix="mimo-flash-demo-")) / "checkpoint"
    t0 = time.time()
    model.save_pretrained(out)
    again = MiMoForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, config.vocab_size, (1, 3 * config.sliding_window))
    with torch.no_grad():
        a, b = model(ids, labels=ids, mtp=True), again(ids, labels=ids, mtp=True)
    diff = (a.logits - b.logits).abs().max().item()
    print(f"saved to {out} and reloaded in {time.time() - t0:.2f}s; logits max abs diff {diff:.1e}; "
          f"loss {a.loss.item():.4f} (untrained)")
    return 0 if diff == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimo-flash", description="MiMo-V2-Flash in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):
                continue  # that part of the package does not exist (yet)
            raise
        mod.register(sub)
    if "demo" not in sub.choices:
        p = sub.add_parser("demo", help="the main job: build, save, reload and run a tiny model")
        p.add_argument("--out", help="directory for the demo's outputs (default: a temporary one)")
        p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (UserError, ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mimo-flash {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
