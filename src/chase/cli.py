"""The ``chase`` command: ``train``, ``export``, and the measurement commands ``bench``, ``flops``,
``analyze``."""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Optional

__all__ = ["main"]

PENDING = {
    "bench": "throughput/latency of dense vs slim models",
    "flops": "dense, sparse and slim FLOPs of a model or checkpoint",
    "analyze": "per-channel density statistics and plots of a sparse checkpoint",
}


def _train_parser(sub: argparse._SubParsersAction) -> None:
    from chase.train.config import config_help

    p = sub.add_parser(
        "train",
        help="train a model with dense, static, SET, RigL, MEST or Chase sparse training",
        description="Train from YAML config files and key=value overrides (later ones win). The run folder "
        "gets the resolved config, checkpoint.pt, metrics.jsonl, report.md and the exported model. "
        "Under torchrun every process joins the run; only rank 0 writes.",
        epilog="options (for the YAML files and --set; type, default, meaning):\n" + config_help(),
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


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write the exported (slim) model of a training checkpoint",
        description="Rebuild the model from a checkpoint's config and write the slim model "
        "(Chase) or the masked weights (other methods); load it with chase.load_slim.",
    )
    p.add_argument("checkpoint", help="a run folder or its checkpoint.pt")
    p.add_argument("--output", "-o", help="output file (default: slim.pt next to the checkpoint)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chase", description="Channel-aware dynamic sparse training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)
    _export_parser(sub)
    for name, what in PENDING.items():
        p = sub.add_parser(
            name,
            help=f"{what} (arrives with the measurement issue)",
            description=f"{what}. Not available yet: arrives with the measurement issue.",
        )
        p.add_argument("args", nargs=argparse.REMAINDER, help="reserved")
    return parser


def _train(args: argparse.Namespace) -> int:
    from chase.train import load_config, train

    sets = [kv for group in args.overrides for kv in group]
    if args.data_dir:
        sets.append(f"data_dir={args.data_dir}")
    if args.out:
        sets.append(f"out={args.out}")
    if args.quiet:
        sets.append("quiet=true")
    run_dir: Optional[pathlib.Path] = None
    files = list(args.config)
    if args.resume:
        run_dir = pathlib.Path(args.resume)
        if not files:
            if not (run_dir / "config.yaml").is_file():
                raise_config(f"cannot resume: {run_dir / 'config.yaml'} does not exist")
            files = [run_dir / "config.yaml"]
    cfg = load_config(files, sets)
    results = train(cfg, run_dir, resume=bool(args.resume))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 prints the table
        return 0
    width = max(map(len, results))
    for k, v in results.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return 0


def raise_config(msg: str) -> None:
    from chase.train.config import ConfigError

    raise ConfigError(msg)


def _export(args: argparse.Namespace) -> int:
    from chase.train.export import export_checkpoint

    path = pathlib.Path(args.checkpoint)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise_config(f"{path} does not exist")
    out = pathlib.Path(args.output) if args.output else path.with_name("slim.pt")
    meta = export_checkpoint(path, out)
    print(
        f"wrote {out} ({meta['model']}, {meta['method']}); load it with "
        f"chase.load_slim(get_model({meta['model']!r}, num_classes={meta['num_classes']}), "
        f"torch.load({str(out)!r}, weights_only=True))"
    )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``chase`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command in PENDING:
        print(
            f"chase {args.command}: not available yet -- it arrives with the measurement issue "
            f"({PENDING[args.command]}).",
            file=sys.stderr,
        )
        return 2
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    from chase.train.config import ConfigError

    try:
        return _train(args) if args.command == "train" else _export(args)
    except ConfigError as e:
        print(f"chase {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
