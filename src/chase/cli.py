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

MEASURE = ("flops", "bench", "analyze")


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
    p.add_argument(
        "--onnx",
        nargs="?",
        const="",
        metavar="PATH",
        help="also write the exported model as ONNX (default: the output's name with .onnx, e.g. slim.onnx) "
        "and check it against PyTorch with onnxruntime at two batch sizes (needs chase-dst[onnx])",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chase", description="Channel-aware dynamic sparse training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)
    _export_parser(sub)
    _flops_parser(sub)
    _bench_parser(sub)
    _analyze_parser(sub)
    _check_parser(sub)
    return parser


def _check_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="does Chase work on this model? a miniature run: discover, train, shrink, export, reload",
        description="Build the model, train it a few steps on random data with channel events and "
        "physical removal, export the slim model, reload it into a fresh model with chase.load_slim and "
        "compare the outputs (chase.check.check_model). Exit status 0 when everything worked, 1 otherwise.",
    )
    p.add_argument(
        "--model", "-m", required=True, help="a chase.models name (torchvision, timm:<name>, CIFAR zoo)"
    )
    p.add_argument("--input", type=int, default=64, help="square input size (64)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--channel-sparsity", type=float, default=0.5)
    p.add_argument("--prune-skip", action="store_true", help="also prune residual-stream channels")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")


def _check(args: argparse.Namespace) -> int:
    import json

    import torch

    from chase.check import check_model
    from chase.models import get_model

    get_model(args.model, num_classes=args.num_classes)  # an unknown name is a usage error, not a report
    report = check_model(
        lambda: get_model(args.model, num_classes=args.num_classes),
        torch.randn(2, 3, args.input, args.input),
        prune_skip=args.prune_skip,
        channel_sparsity=args.channel_sparsity,
    )
    print(f"{args.model} (input {args.input}, prune_skip={args.prune_skip}): {report.summary()}")
    for w in report.warnings:
        print(f"  warning: {w}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.ok else 1


def _model_args(p: argparse.ArgumentParser, source_help: str) -> None:
    p.add_argument("source", nargs="?", help=source_help)
    p.add_argument("--model", "-m", help="model name (chase.models.get_model), built untrained")
    p.add_argument("--input", type=int, help="input image size (default: the run's, or 224)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier size for --model (1000)")
    p.add_argument(
        "--channel-sparsity",
        type=float,
        metavar="S",
        help="with --model: also measure a slim model of Chase's final width at S, channels removed at "
        "once from the untrained model (an UNTRAINED-width model, labelled so)",
    )
    p.add_argument("--prune-skip", action="store_true", help="with --channel-sparsity: prune the skip path")
    p.add_argument(
        "--density",
        type=float,
        help="with --channel-sparsity: weight density of the initial masks the channels are ranked on, as "
        "Chase ranks them at its first event (default: chase.train.measure.INIT_DENSITY, the paper's d)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def _flops_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flops",
        help="dense, sparse and GPU-supported (slim) MACs of a model or checkpoint",
        description="Multiply-accumulates of the Conv/Linear layers for one image at inference: dense, "
        "sparse (kept weights x output size) and GPU-supported (the slim model counted dense), with "
        "ratios to the dense model.",
    )
    _model_args(p, "a run folder or its checkpoint.pt (instead of --model)")
    p.add_argument("--layers", action="store_true", help="print the per-layer table too")


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="throughput and latency of dense vs slim models",
        description="Time dense vs slim inference (median after warm-up, CUDA synchronised) over batch "
        "sizes, dtypes, layouts and eager/compiled; print a table with the realised speedup next to the "
        "FLOPs ratio and write JSON (--json, or bench.json in the run folder). Unsupported combinations "
        "are skipped with a note.",
    )
    _model_args(p, "a Chase run folder or checkpoint: its exported model is the slim one")
    p.add_argument("--slim-from", metavar="CHECKPOINT", help="same as the positional run/checkpoint")
    p.add_argument("--batch-sizes", help="comma-separated (default 1,8,32 on CPU; up to 256 on CUDA)")
    p.add_argument("--dtypes", default="fp32", help="comma-separated from fp32,bf16,fp16 (default fp32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--channels-last", choices=("off", "on", "both"), default="off", help="memory format")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile'd models (Inductor, inference freezing)",
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards first (3)")
    p.add_argument("--repeats", type=int, default=10, help="timed forwards; the median is reported (10)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs")
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also export dense and slim to ONNX, check them with onnxruntime and time them on the CPU "
        "next to PyTorch (fp32 only; with as many threads as PyTorch; needs chase-dst[onnx])",
    )


def _analyze_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="per-channel density statistics and plots of a sparse checkpoint",
        description="Per-layer channel densities and the share of sparse amenable channels (chase."
        "channel_stats), printed, and a PNG histogram (channel_density.png in the run folder or --out).",
    )
    p.add_argument("source", help="a run folder or its checkpoint.pt")
    p.add_argument("--out", "-o", help="PNG file or folder (default: the run folder)")
    p.add_argument(
        "--amenable-ratio",
        type=float,
        default=0.5,
        help="a channel is sparse amenable below this x its layer's density (0.5)",
    )


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
    onnx = None if args.onnx is None else pathlib.Path(args.onnx or out.with_suffix(".onnx"))
    meta = export_checkpoint(path, out, onnx=onnx)
    print(
        f"wrote {out} ({meta['model']}, {meta['method']}); load it with "
        f"chase.load_slim(get_model({meta['model']!r}, num_classes={meta['num_classes']}), "
        f"torch.load({str(out)!r}, weights_only=True))"
    )
    if onnx is not None:
        c = meta["onnx"]
        print(
            f"wrote {onnx}; onnxruntime {c['onnxruntime']} matches PyTorch at batch sizes "
            f"{c['batch_sizes']}: "
            f"max |diff| {c['max_abs_diff']:.3g}, largest |output| {c['max_abs_output']:.3g} "
            f"(relative {c['relative_diff']:.2g}, allowed {c['atol']:g} + {c['rtol']:g} x largest)"
        )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``chase`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    # The measurement commands print their own tables; the library's INFO lines would interleave.
    quiet = getattr(args, "quiet", False) or args.command in (*MEASURE, "check")
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    from chase.train.config import ConfigError

    errors: tuple[type[Exception], ...] = (ConfigError,)
    if args.command == "export" and args.onnx is not None:
        from chase.onnx import OnnxCheckError

        # A missing optional package (its message says what to install) or an ONNX file that does
        # not compute the model: the user's to fix, reported without a traceback.
        errors = (ConfigError, ModuleNotFoundError, OnnxCheckError)
    try:
        if args.command in MEASURE:
            from chase.train import measure

            errors = (*errors, measure.CommandError)
            return getattr(measure, f"{args.command}_command")(args)
        if args.command == "check":
            errors = (*errors, ValueError, ImportError)  # an unknown model name, timm not installed
            return _check(args)
        return _train(args) if args.command == "train" else _export(args)
    except errors as e:
        print(f"chase {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
