"""What several commands share: the model-or-run arguments, the models they measure, JSON output."""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any, Optional

import torch
from torch import nn

from chase.sparsifier.channel_pruning import INIT_DENSITY, untrained_label, untrained_slim
from chase.train.export import LoadedRun, load_run

__all__ = ["CommandError", "add_model_args", "example_input", "models_to_measure", "write_json"]


class CommandError(ValueError):
    """A user error: printed without a traceback, exit status 2."""


def add_model_args(p: argparse.ArgumentParser, source_help: str) -> None:
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
        f"Chase ranks them at its first event (default {INIT_DENSITY}, the paper's d)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def example_input(run: Optional[LoadedRun], args: argparse.Namespace) -> torch.Tensor:
    size = args.input or (run.image_size if run else 224)
    return torch.zeros(1, 3, size, size)


def models_to_measure(
    args: argparse.Namespace,
) -> tuple[nn.Module, Optional[nn.Module], Optional[LoadedRun], str]:
    """(dense reference, slim model or None, the run if any, a label saying what "slim" is)."""
    from chase.models import get_model

    source = getattr(args, "source", None) or getattr(args, "slim_from", None)
    if source and getattr(args, "channel_sparsity", None) is not None:
        raise CommandError("give a checkpoint or --channel-sparsity, not both")
    if source:
        run = load_run(source)
        if args.model and args.model != run.model_name:
            raise CommandError(f"--model {args.model} but the checkpoint trained {run.model_name}")
        dense = get_model(run.model_name, num_classes=run.num_classes).eval()
        slim = run.slim()
        what = f"exported model of {run.path} ({run.method})" if slim is not None else ""
        return dense, slim, run, what
    if not args.model:
        raise CommandError("give a model name (--model) or a run folder / checkpoint")
    dense = get_model(args.model, num_classes=args.num_classes).eval()
    if getattr(args, "channel_sparsity", None) is None:
        return dense, None, None, ""
    s, skip = args.channel_sparsity, args.prune_skip
    d = INIT_DENSITY if getattr(args, "density", None) is None else args.density
    slim = untrained_slim(dense, example_input(None, args), s, skip, density=d)
    return dense, slim, None, untrained_label(s, skip, d)


def write_json(obj: Any, path: str | pathlib.Path) -> None:
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(json.dumps(obj, indent=2) + "\n")
    print(f"wrote {path}")
