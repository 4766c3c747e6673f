"""``chase check``: does Chase work on this model? A miniature run on random data."""

from __future__ import annotations

import argparse

NAME = "check"
LOG_PROGRESS = False


#: the channel options ``chase check`` offers (its own schedule runs every event; removal and widths are
#: exercised as given).
ROLES = ("groups", "amount", "ranking", "removal", "budget")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from chase.cli.args import add_out_args, add_size_args, add_spec_args

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
    add_size_args(p)
    p.add_argument(
        "--explain",
        action="store_true",
        help="also list every channel group: its layers, and for a group that is kept, the layer or op "
        "that keeps it and what would unblock it",
    )
    add_spec_args(p.add_argument_group("channel options (default: --channel-sparsity 0.5)"), ROLES)
    add_out_args(p, "also write the report as JSON to this file")


def run(args: argparse.Namespace) -> int:
    import torch

    from chase.check import CHECK_CHANNELS, check_model
    from chase.cli.args import given_spec_args
    from chase.cli.common import claim_output, write_json
    from chase.models import get_model
    from chase.sparsifier.specs import specs_from_flat

    claim_output(args.out, overwrite=args.overwrite)  # before the run, not after it
    given = given_spec_args(args)
    given.setdefault("channel_sparsity", CHECK_CHANNELS.channel_sparsity)
    channels, budget = specs_from_flat(given)  # a bad option is a usage error
    get_model(args.model, num_classes=args.num_classes)  # an unknown name is a usage error, not a report
    report = check_model(
        lambda: get_model(args.model, num_classes=args.num_classes),
        torch.randn(2, 3, args.input, args.input),
        channels,
        budget,
    )
    options = ", ".join(p for p in (channels.describe(), budget.describe()) if p)
    print(f"{args.model} (input {args.input}, {options}): {report.summary()}")
    for w in report.warnings:
        print(f"  warning: {w}")
    if report.explain:  # the graph check_model traced (none when the model failed before it)
        print(report.explain if args.explain else f"  {report.kept or 'every channel group is prunable'}")
    if args.out:
        write_json(report.to_dict(), args.out)
    return 0 if report.ok else 1
