"""The `mimo-flash` command line.

Each part of the package that has commands provides a `commands` module with `register(subparsers)`;
a subcommand's handler takes the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import warnings

COMMAND_MODULES = (
    "mimo_flash.checkpoint.commands",   # convert
    "mimo_flash.generation.commands",   # generate, chat
    "mimo_flash.training.commands",     # demo, train
    "mimo_flash.training.tokenize_cmd", # tokenize
    "mimo_flash.serving.commands",      # serve
    "mimo_flash.plan",                  # plan
)


class UserError(Exception):
    """Bad input from the user: printed as one line, no traceback."""


def finite_float(text: str) -> float:
    """argparse type of every float option: a finite number (nan and inf are refused by name)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows each option's default: "(default: X)" after its help, unless the default is None or
    False (an option whose default depends on something else says so in its own help text)."""

    def _get_help_string(self, action):
        text = (action.help or "").strip()
        d = action.default
        if "default" in text or d is None or d is False or d == [] or d is argparse.SUPPRESS \
                or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".lstrip()


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
    for p in sub.choices.values():
        p.formatter_class = DefaultsHelpFormatter
        for a in p._actions:
            if a.help is None and a.default is not None and a.default is not False:
                a.help = "(default: %(default)s)"  # argparse prints nothing for an option without help
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def show(message, category, filename, lineno, file=None, line=None):  # one line, no source location
        print(f"mimo-flash {args.command}: warning: {message}", file=sys.stderr)

    ok = False
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            code = int(args.fn(args) or 0)
        ok = True
        return code
    except (UserError, ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mimo-flash {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .training.trainer import TrainingDiverged
        if not isinstance(e, TrainingDiverged):
            raise
        print(f"mimo-flash {args.command}: error: training diverged at {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        from .distributed.context import leave_distributed
        leave_distributed(ok)  # (a command under torchrun)


if __name__ == "__main__":
    # `python -m mimo_flash.cli` (torchrun's form) runs this file as __main__: take main from the package
    # module, whose UserError is the one the commands raise
    from mimo_flash.cli import main as package_main
    sys.exit(package_main())
