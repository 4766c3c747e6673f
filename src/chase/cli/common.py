"""What several commands share: the model-or-run arguments, the models they measure, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from typing import Any, Optional

import torch
from torch import nn

from chase.cli.args import MODEL_INPUT, given_spec_args
from chase.io import atomic_write_text
from chase.sparsifier.one_shot import INIT_DENSITY, untrained_label, untrained_slim
from chase.sparsifier.specs import specs_from_flat
from chase.train.export import LoadedRun, load_run

__all__ = [
    "RUN_INPUTS",
    "CommandError",
    "claim_output",
    "example_input",
    "models_to_measure",
    "write_json",
]


class CommandError(ValueError):
    """A user error: printed without a traceback, exit status 2."""


def example_input(run: Optional[LoadedRun], args: argparse.Namespace) -> torch.Tensor:
    size = args.input or (run.image_size if run else MODEL_INPUT)
    return torch.zeros(1, 3, size, size)


def models_to_measure(
    args: argparse.Namespace,
) -> tuple[nn.Module, Optional[nn.Module], Optional[LoadedRun], str]:
    """(dense reference, slim model or None, the run if any, a label saying what "slim" is)."""
    from chase.models import get_model

    source = getattr(args, "source", None) or getattr(args, "slim_from", None)
    given = given_spec_args(args)
    # What sets an amount of channels to remove; every other channel option shapes how.
    widths = any(k in ("channel_sparsity", "target") or k.endswith("_ratio") for k in given)
    if source and given:
        raise CommandError("give a checkpoint or untrained widths (--channel-sparsity, a budget), not both")
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
    if not widths and given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise CommandError(
            f"{flags} applies to untrained widths: give --channel-sparsity or a budget (--macs-ratio, "
            "--params-ratio, --latency-ratio)"
        )
    dense = get_model(args.model, num_classes=args.num_classes).eval()
    if not widths:
        return dense, None, None, ""
    channels, budget = specs_from_flat(given)
    d = INIT_DENSITY if getattr(args, "density", None) is None else args.density
    slim = untrained_slim(dense, example_input(None, args), density=d, channels=channels, budget=budget)
    return dense, slim, None, untrained_label(channels, budget, d)


#: files of a run folder that no command's output replaces: without them the run cannot resume.
RUN_INPUTS = ("checkpoint.pt", "config.yaml", "metrics.jsonl")


def claim_output(
    output: str | pathlib.Path | None,
    *inputs: str | pathlib.Path | None,
    folder: bool = False,
    overwrite: bool = False,
    default: bool = False,
) -> None:
    """The one check every command runs before it writes ``output``: never one of the command's
    ``inputs`` or a run folder's checkpoint, config or metrics (the run could no longer resume); an
    existing file or a non-empty folder only with ``overwrite``, unless it is the command's own
    ``default`` output, which it regenerates (``chase analyze``'s plots in the run folder). ``folder``:
    the output is a folder."""
    if output is None:
        return
    out = pathlib.Path(output).expanduser().resolve()
    protected = set()
    for given in inputs:
        if given is None:
            continue
        path = pathlib.Path(given).expanduser().resolve()
        parent = path if path.is_dir() else path.parent
        protected |= {path, parent} | {parent / name for name in RUN_INPUTS}
    if out.name in RUN_INPUTS and (out.parent / "checkpoint.pt").exists():
        protected.add(out)  # a file of some run folder, whatever the command's inputs
    if out in protected:
        raise CommandError(f"refusing to write {output}: it is an input of this command or a file of the run")
    if out.is_dir() and not folder:
        raise CommandError(f"{output} is a folder; give a file name")
    if out.is_file() and folder:
        raise CommandError(f"{output} is a file; give a folder")
    exists = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if exists and not (overwrite or default):
        raise CommandError(f"{output} exists: give --overwrite to replace it (nothing was written)")
    # The folder is made when the output is written; refuse now, not after the work, if it cannot be.
    base = out if out.is_dir() else out.parent
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise CommandError(f"cannot write {output}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise CommandError(f"cannot write {output}: {base} is not writable (nothing was written)")


def write_json(obj: Any, path: str | pathlib.Path) -> None:
    """The JSON output of a command, written atomically (its folder made if needed)."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
    print(f"wrote {path}")
