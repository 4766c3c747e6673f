"""Argument types and shared arguments of the commands (argparse only: cheap to import for --help)."""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["OneLineParser", "add_model_args", "nonnegative_int", "positive_int", "positive_ints"]


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line ``chase <command>: error: ...`` (exit 2),
    like every other error of the command line; ``--help`` shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(low: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(1, text)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(0, text)


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated integers >= 1."""
    return [positive_int(t.strip()) for t in text.split(",") if t.strip()] or [positive_int(text)]


def add_model_args(p: argparse.ArgumentParser, source_help: str) -> None:
    p.add_argument("source", nargs="?", help=source_help)
    p.add_argument("--model", "-m", help="model name (chase.models.get_model), built untrained")
    p.add_argument("--input", type=positive_int, help="input image size (default: the run's, or 224)")
    p.add_argument(
        "--num-classes", type=positive_int, default=1000, help="classifier size for --model (1000)"
    )
    p.add_argument(
        "--channel-sparsity",
        type=float,
        metavar="S",
        help="with --model: also measure a slim model of Chase's final width at S, channels removed at "
        "once from the untrained model (an UNTRAINED-width model, labelled so)",
    )
    p.add_argument("--prune-skip", action="store_true", help="with --channel-sparsity: prune the skip path")
    p.add_argument(
        "--prune-heads", action="store_true", help="with --channel-sparsity: also remove attention heads"
    )
    p.add_argument(
        "--macs-ratio",
        type=float,
        metavar="R",
        help="with --model: like --channel-sparsity, but remove channels until the model's MACs are R of the "
        "dense model's (Chase's target=macs; --channel-sparsity, if given, sets the floors)",
    )
    p.add_argument(
        "--channel-rank",
        default="score",
        help="with --channel-sparsity or --macs-ratio: rank channels by score (the paper; default), "
        "normalized (score over its group's mean: every group pruned at a similar rate), uniform (the "
        "same share of every group), latency_weighted (a share growing with the group's time per MAC or "
        "channel, by --latency-table) or, with --macs-ratio, score_per_cost (score per MAC saved)",
    )
    p.add_argument(
        "--latency-table",
        metavar="FILE",
        help="with --channel-rank latency_weighted: the latency table `chase profile` wrote for this model",
    )
    p.add_argument(
        "--channel-multiple",
        type=positive_int,
        default=1,
        metavar="M",
        help="with --channel-sparsity or --macs-ratio: every pruned group keeps a multiple of M channels (1)",
    )
    p.add_argument(
        "--density",
        type=float,
        help="with --channel-sparsity: weight density of the initial masks the channels are ranked on, as "
        "Chase ranks them at its first event (default: the paper's d, chase.sparsifier.channel_pruning."
        "INIT_DENSITY)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
