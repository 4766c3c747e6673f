"""Argument types and shared arguments of the commands (argparse only: cheap to import for --help)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = [
    "OneLineParser",
    "add_model_args",
    "add_out_args",
    "add_spec_args",
    "comma_list",
    "device_arg",
    "given_spec_args",
    "nonnegative_int",
    "positive_int",
    "positive_ints",
]


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


def device_arg(text: str) -> str:
    """A ``--device`` value as a device string: ``auto`` is CUDA when there is one; an unknown device or
    CUDA without a GPU is a usage error (ValueError), as the trainer's ``device`` check says."""
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device {text!r} is not a device (auto, cpu, cuda, cuda:1, ...): {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text} but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text}: only cpu and cuda are supported")
    return text


class _Single(argparse.Action):
    """Stores its value, refusing a second, different one for the same ``dest`` (``-o a --json b``: which
    one was meant?)."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        before = getattr(namespace, self.dest, None)
        if before is not None and before != values:
            parser.error(f"{option_string} {values} and an earlier {before} name the same output: give one")
        setattr(namespace, self.dest, values)


class _Deprecated(_Single):
    """An old spelling of another option: stores into its ``dest`` and says, once, to use the new one."""

    def __init__(self, *args: Any, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(*args, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        import logging

        logging.getLogger("chase.cli").warning("%s is deprecated: give %s", option_string, self.new)
        super().__call__(parser, namespace, values, option_string)


def add_out_args(p: argparse.ArgumentParser, help: str, *, default: str = "") -> None:
    """The output convention of every command: ``--out/-o`` names what it writes, ``--overwrite`` lets
    it replace an existing file (a run's checkpoint, config and metrics never: see
    :func:`chase.cli.common.claim_output`); ``--json`` is the old spelling of ``--out``."""
    p.add_argument(
        "--out",
        "-o",
        action=_Single,
        metavar="PATH",
        help=help + (f" (default: {default})" if default else ""),
    )
    p.add_argument(
        "--json", dest="out", action=_Deprecated, new="--out", metavar="PATH", help="same as --out"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the output if it exists (a run's checkpoint.pt, config.yaml and metrics.jsonl never)",
    )


def comma_list(text: str) -> list[str]:
    """argparse type: comma-separated names (empty entries dropped)."""
    return [t.strip() for t in text.split(",") if t.strip()]


#: the roles of channel options a command that builds untrained widths offers.
WIDTH_ROLES = ("groups", "amount", "ranking", "budget")


def add_spec_args(p: argparse.ArgumentParser, roles: Sequence[str]) -> None:
    """One flag per channel option of ``roles`` (:data:`chase.sparsifier.specs.ROLES`), generated from
    ``chase.ChannelSpec``, the budget kinds and the cost models, with their help: ``--channel-sparsity``,
    ``--prune-skip/--no-prune-skip``, ``--keep-channels a,b``, ``--macs-ratio``, ``--latency-table``...
    Every flag defaults to None (not given: the library's default)."""
    from chase.sparsifier.specs import ROLES, flat_options

    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown option roles {unknown}")
    for o in flat_options().values():
        if o.role not in roles:
            continue
        default = "" if o.default in (None, (), False) else f" (default {o.default})"
        kw: dict[str, Any] = {"default": None, "help": o.help + default}
        if o.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif o.type is list:
            kw.update(type=comma_list, metavar="A,B")
        elif o.choices:
            kw["choices"] = list(o.choices)
        else:
            kw.update(type=o.type, metavar=o.metavar or o.type.__name__.upper())
        p.add_argument("--" + o.name.replace("_", "-"), **kw)


def given_spec_args(args: argparse.Namespace, roles: Sequence[str] | None = None) -> dict[str, Any]:
    """The channel options (of ``roles``, default all) given on the command line (flags left at None are
    not)."""
    from chase.sparsifier.specs import flat_options

    options = flat_options()
    return {
        k: v
        for k, v in vars(args).items()
        if k in options and v is not None and (roles is None or options[k].role in roles)
    }


#: the square input size and classifier width a command builds a named model with (check, flops, bench,
#: profile), unless a run gives its own.
MODEL_INPUT = 224
MODEL_CLASSES = 1000


def add_size_args(p: argparse.ArgumentParser, *, from_run: bool = False) -> None:
    """``--input`` and ``--num-classes``, with the same defaults in every command (a run's own size first
    where the command reads a run)."""
    where = "the run's, or " if from_run else ""
    p.add_argument(
        "--input",
        type=positive_int,
        default=None if from_run else MODEL_INPUT,
        help=f"square input size ({where}{MODEL_INPUT})",
    )
    p.add_argument(
        "--num-classes",
        type=positive_int,
        default=MODEL_CLASSES,
        help=f"classifier outputs of --model ({MODEL_CLASSES})",
    )


def add_model_args(p: argparse.ArgumentParser, source_help: str) -> None:
    """The model-or-run arguments of flops/bench: a run, or a model name with optional untrained widths
    (every channel option of :data:`WIDTH_ROLES`)."""
    p.add_argument("source", nargs="?", help=source_help)
    p.add_argument("--model", "-m", help="model name (chase.models.get_model), built untrained")
    add_size_args(p, from_run=True)
    widths = p.add_argument_group(
        "untrained widths (with --model)",
        "Also measure a slim model of Chase's final width: --channel-sparsity S (of the prunable channels) "
        "or a budget (--macs-ratio R, --params-ratio R, --latency-ratio R with --latency-table or "
        "--roofline), channels removed at once from the untrained model (an UNTRAINED-width model, "
        "labelled so).",
    )
    add_spec_args(widths, WIDTH_ROLES)
    widths.add_argument(
        "--density",
        type=float,
        help="weight density of the initial masks the channels are ranked on, as Chase ranks them at its "
        "first event (default: the paper's d, chase.sparsifier.one_shot.INIT_DENSITY)",
    )
    add_out_args(p, "also write the results as JSON to this file")
