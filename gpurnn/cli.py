"""`gpurnn` command line. Each subcommand lives in gpurnn/commands/<name>.py and exposes
`add_parser(subparsers)` (which registers it and sets `func`) — so owners never share a file.
A module that fails to import does not take the others down, nor vanish: its subcommand stays
listed and reports the exception when run (exit status 1), and --help names it."""
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
    broken = {}
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"gpurnn.commands.{name}")
        except Exception as exc:   # reported by --help and by the subcommand itself, below
            broken[name] = exc
            _add_broken(sub, name, exc)
            continue
        mod.add_parser(sub)
    if broken:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = "\n".join(_import_failure(name, exc) for name, exc in broken.items())
    return parser


def _import_failure(name, exc):
    return (f"gpurnn {name}: unavailable, gpurnn.commands.{name} failed to import: "
            f"{type(exc).__name__}: {exc} (python -c 'import gpurnn.commands.{name}' shows the "
            f"traceback)")


def _add_broken(sub, name, exc):
    """A subcommand whose module did not import: it stays listed, and running it (with any
    arguments: main does not parse them) says why on stderr and exits 1, instead of vanishing
    from the command line."""
    p = sub.add_parser(name, help=f"(unavailable: {type(exc).__name__} on import)", add_help=False,
                       description=_import_failure(name, exc))

    def report(args):
        print(f"gpurnn: error: {_import_failure(name, exc)}", file=sys.stderr)
        return 1
    p.set_defaults(func=report, unavailable=True)


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "unavailable", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")   # what parse_args says
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
