"""`gpurnn` command line. Each subcommand lives in gpurnn/commands/<name>.py and exposes
`add_parser(subparsers)` (which registers it and sets `func`) — so owners never share a file."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("info", "check", "bench", "kernels")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    parser = argparse.ArgumentParser(prog="gpurnn", description="gpurnn: fused persistent RNN kernels")
    parser.add_argument("--version", action="version", version=f"gpurnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"gpurnn.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"gpurnn.commands.{name}":
                raise
            continue  # subcommand not written yet
        mod.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
