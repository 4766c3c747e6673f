"""``chase check``: does Chase work on this model? A miniature run on random data."""

from __future__ import annotations

import argparse
import json
import pathlib

NAME = "check"
LOG_PROGRESS = False


def add_parser(sub: argparse._SubParsersAction) -> None:
    from chase.cli.args import positive_int

    p = sub.add_parser(
        NAME,
        help="does Chase work on this model? a miniature run: discover, train, shrink, export, reload",
        description="Build the model, train it a few steps on random data with channel events and "
        "physical removal, export the slim model, reload it into a fresh model with chase.load_slim and "
        "compare the outputs (chase.check.check_model). Exit status 0 when everything worked, 1 otherwise.",
    )
    p.add_argument(
        "--model", "-m", required=True, help="a chase.models name (torchvision, timm:<name>, CIFAR zoo)"
    )
    p.add_argument("--input", type=positive_int, default=64, help="square input size (64)")
    p.add_argument("--num-classes", type=positive_int, default=10)
    p.add_argument("--channel-sparsity", type=float, default=0.5)
    p.add_argument("--prune-skip", action="store_true", help="also prune residual-stream channels")
    p.add_argument("--prune-heads", action="store_true", help="also remove whole attention heads")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")


def run(args: argparse.Namespace) -> int:
    import torch

    from chase.check import check_model
    from chase.models import get_model
    from chase.sparsifier.channel_pruning import check_channel_options

    check_channel_options(channel_sparsity=args.channel_sparsity, min_channel_ratio=0.2)  # a usage error
    get_model(args.model, num_classes=args.num_classes)  # an unknown name is a usage error, not a report
    report = check_model(
        lambda: get_model(args.model, num_classes=args.num_classes),
        torch.randn(2, 3, args.input, args.input),
        prune_skip=args.prune_skip,
        prune_heads=args.prune_heads,
        channel_sparsity=args.channel_sparsity,
    )
    options = f"prune_skip={args.prune_skip}" + (", prune_heads=True" if args.prune_heads else "")
    print(f"{args.model} (input {args.input}, {options}): {report.summary()}")
    for w in report.warnings:
        print(f"  warning: {w}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.ok else 1
