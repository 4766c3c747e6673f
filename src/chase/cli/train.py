"""``chase train``: train from YAML configs and ``key=value`` overrides, or resume a run."""

from __future__ import annotations

import argparse
import os
import pathlib

NAME = "train"
LOG_PROGRESS = True


def add_parser(sub: argparse._SubParsersAction) -> None:
    from chase.cli.args import add_spec_args
    from chase.sparsifier.specs import ROLES
    from chase.train.config import config_help

    p = sub.add_parser(
        NAME,
        help="train a model with dense, static, SET, RigL, MEST or Chase sparse training",
        description="Train from YAML config files and key=value overrides (later ones win). The run folder "
        "gets the resolved config, checkpoint.pt, metrics.jsonl, report.md and the exported model. "
        "Under torchrun every process joins the run; only rank 0 writes.",
        epilog="options (for the YAML files and --set; type, default, meaning; null: the library's "
        "default for the method):\n" + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        "-c",
        action="append",
        default=[],
        metavar="FILE",
        help="YAML config (repeatable; a file may name others with 'base:')",
    )
    p.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override options, e.g. --set lr=0.05 method=rigl milestones=80,120",
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its checkpoint (its config.yaml is the config; "
        "--set may only change options that do not alter the result)",
    )
    p.add_argument("--data-dir", help="dataset folder (same as --set data_dir=...)")
    p.add_argument("--out", help="parent folder of run folders (same as --set out=...)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, warnings only")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in a folder that holds an earlier run's outputs but no checkpoint",
    )
    add_spec_args(
        p.add_argument_group("channel options (chase; each is the same as --set key=value)"), tuple(ROLES)
    )


def run(args: argparse.Namespace) -> int:
    from chase.cli.args import given_spec_args
    from chase.train import ConfigError, load_config, train

    sets = [kv for group in args.overrides for kv in group]
    for key, value in given_spec_args(args).items():  # the channel flags are --set overrides
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, list):
            value = ",".join(value)
        sets.append(f"{key}={value}")
    if args.data_dir:
        sets.append(f"data_dir={args.data_dir}")
    if args.out:
        sets.append(f"out={args.out}")
    if args.quiet:
        sets.append("quiet=true")
    run_dir = None
    files = list(args.config)
    if args.resume:
        run_dir = pathlib.Path(args.resume)
        if not files:
            if not (run_dir / "config.yaml").is_file():
                raise ConfigError(f"cannot resume: {run_dir / 'config.yaml'} does not exist")
            files = [run_dir / "config.yaml"]
    cfg = load_config(files, sets)
    results = train(cfg, run_dir, resume=bool(args.resume), overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 prints the table
        return 0
    width = max(map(len, results))
    for k, v in results.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return 0
