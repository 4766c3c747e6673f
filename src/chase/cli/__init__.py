"""The ``chase`` command: ``train``, ``export``, ``check`` and the measurement commands ``flops``, ``bench``,
``analyze``. One module per command owns its arguments, its printing and its exit status; the library
and the trainer never import this package."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from typing import Any, Optional

from chase.cli import analyze, bench, check, export, flops, profile, train
from chase.cli.args import OneLineParser

__all__ = ["build_parser", "main"]

COMMANDS = {m.NAME: m for m in (train, export, flops, bench, analyze, check, profile)}


def build_parser() -> argparse.ArgumentParser:
    from chase import __version__

    parser = OneLineParser(prog="chase", description="Channel-aware dynamic sparse training.")
    parser.add_argument("--version", action="version", version=f"chase-dst {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def _show_warning(message: Any, category: type, filename: str, lineno: int, *_: Any) -> None:
    """A Python warning as one line of the command's output (not the library's file, line and source)."""
    logging.getLogger("chase.cli").warning("warning: %s", message)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``chase`` console script; returns the exit status.

    A usage error (a bad option value, a file that is not what the command needs, an optional package
    missing, an ONNX file that does not compute the model, a backend that cannot deploy it here, a full
    disk or an unreadable file) is one line ``chase <command>: error: ...`` and exit status 2; anything
    else is a bug and keeps its traceback."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, its line already printed)
        return e.code if isinstance(e.code, int) else 2
    command = COMMANDS[args.command]
    # The measurement commands print their own tables; the library's INFO lines would interleave.
    quiet = getattr(args, "quiet", False) or not command.LOG_PROGRESS
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    from chase.deploy import DeployError
    from chase.onnx import OnnxCheckError

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return command.run(args)
    except (ValueError, ImportError, OnnxCheckError, DeployError, OSError) as e:  # ConfigError: a ValueError
        print(f"chase {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
