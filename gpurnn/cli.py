"""`gpurnn` command line. Each subcommand lives in gpurnn/commands/<name>.py and exposes
`add_parser(subparsers)` (which registers it and sets `func`) — so owners never share a file."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("info", "check", "bench", "kernels")


class _Parser(argparse.ArgumentParser):
    """argparse's convention for a bad flag (exit status 2, no traceback), on one line: the
    error names the flag; the usage is one --help away. Subcommand parsers are of this class too."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    parser = _Parser(prog="gpurnn", description="gpurnn: fused persistent RNN kernels")
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
