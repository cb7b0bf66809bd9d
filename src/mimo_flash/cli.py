"""The `mimo-flash` command line.

Each part of the package that has commands provides a `commands` module with `register(subparsers)`;
a subcommand's handler takes the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "mimo_flash.checkpoint.commands",   # convert
    "mimo_flash.generation.commands",   # generate, chat
    "mimo_flash.training.commands",     # demo, train
    "mimo_flash.training.tokenize_cmd", # tokenize
    "mimo_flash.serving.commands",      # serve
)


class UserError(Exception):
    """Bad input from the user: printed as one line, no traceback."""


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
