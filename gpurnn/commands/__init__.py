"""Subcommands of the `gpurnn` command line (gpurnn.cli), and the argument types they share.

A bad flag is argparse's error: one line on stderr naming the flag, exit status 2, no
traceback. The types below raise argparse.ArgumentTypeError, which argparse reports that way
("argument --repeat: must be an integer >= 1; got '0'").
"""
from __future__ import annotations

import argparse
import os


def int_at_least(minimum):
    """An argparse type: an integer >= minimum."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}; got {text!r}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def output_file(text):
    """An argparse type: a path a file can be written to now (its folder exists and is
    writable, and it is not a folder), so a long run is not lost to a typo at its end."""
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; expected a file path")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: folder {folder!r} is not writable")
    if os.path.exists(text) and not os.access(text, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: the file is not writable")
    return text
