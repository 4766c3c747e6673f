"""The algorithms by name: what they are called, their defaults, and the validation of their options.

The library, the trainer's config and the CLI all read this one table, so a name, a default or a rule
lives in one place. An option given as ``None`` means "the algorithm's default".
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from chase.sparse.channels import CHANNEL_SCORES
from chase.sparse.distribution import DISTRIBUTIONS
from chase.sparse.schedules import SWAP_SCHEDULES
from chase.sparsifier.algorithms import MEST, SET, RigL, Static
from chase.sparsifier.base import GROWTH, SCOPES, Sparsifier, check_options
from chase.sparsifier.channel_pruning import CHANNEL_RANKS, REMOVAL_MODES, TARGETS, check_channel_options
from chase.sparsifier.chase import Chase
from chase.sparsifier.latency import LatencyTable

__all__ = ["ALGORITHMS", "CHANNEL_OPTIONS", "CHOICES", "METHODS", "check", "create", "defaults"]

#: name -> class of every sparse training algorithm.
ALGORITHMS: dict[str, type[Sparsifier]] = {
    "static": Static,
    "set": SET,
    "rigl": RigL,
    "mest": MEST,
    "chase": Chase,
}
#: every method a trainer offers: dense training (no sparsifier) and the algorithms.
METHODS: tuple[str, ...] = ("dense", *ALGORITHMS)
#: the allowed values of every option that is a choice.
CHOICES: dict[str, tuple[str, ...]] = {
    "distribution": tuple(DISTRIBUTIONS),
    "growth": tuple(GROWTH),
    "scope": tuple(SCOPES),
    "swap_schedule": tuple(SWAP_SCHEDULES),
    "removal": tuple(REMOVAL_MODES),
    "channel_score": tuple(CHANNEL_SCORES),
    "target": tuple(TARGETS),
    "channel_rank": tuple(CHANNEL_RANKS),
}
#: the options of channel pruning, which only Chase takes.
CHANNEL_OPTIONS = (
    "channel_sparsity",
    "min_channel_ratio",
    "removal",
    "channel_score",
    "channel_every",
    "channel_multiple",
    "target",
    "macs_ratio",
    "params_ratio",
    "latency_ratio",
    "latency_table",
    "channel_rank",
)


def _algorithm(method: str) -> type[Sparsifier]:
    if method not in ALGORITHMS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return ALGORITHMS[method]


def defaults(method: str) -> dict[str, Any]:
    """Every keyword option of ``method`` with its default (the class's own keywords, its preset values and
    the engine's), e.g. ``defaults("chase")["update_every"] == 1000``; ``{}`` for ``"dense"``."""
    if method == "dense":
        return {}
    cls = _algorithm(method)
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" not in vars(klass):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind == p.KEYWORD_ONLY and p.default is not p.empty:
                out[p.name] = p.default
    out.update(getattr(cls, "defaults", {}))
    if cls is Chase:  # Chase's own setdefaults (global MEST exploration)
        out.update(scope="global", growth="gradient")
    return out


#: keywords every algorithm takes without a default (``example_inputs`` for Chase only).
REQUIRED = ("density", "total_steps", "example_inputs")


def check(method: str, **options: Any) -> None:
    """Validate ``options`` of ``method`` without a model (``None`` values take the defaults): unknown
    options, options the method does not take, and values out of range raise ``ValueError`` naming the
    option, by the same rules the constructors apply (the schedule checks need ``total_steps`` and the
    model, and run at construction). ``"dense"`` takes no option."""
    given = {k: v for k, v in options.items() if v is not None}
    if method == "dense":
        if given:
            raise ValueError(f"method 'dense' has no sparsifier, so no option {sorted(given)}")
        return
    known = set(defaults(method)) | set(REQUIRED)
    unknown = sorted(set(given) - known)
    if unknown:
        only_chase = [k for k in unknown if k in defaults("chase")]
        why = f" (options of Chase only: {only_chase})" if only_chase else ""
        raise ValueError(f"method {method!r} has no option(s) {unknown}{why}")
    if "density" not in given:
        raise ValueError("density is required")
    values = {**defaults(method), **given}
    engine = inspect.signature(check_options).parameters
    check_options(**{k: values[k] for k in engine if k in values})
    if _algorithm(method) is Chase:
        check_channel_options(**{k: values[k] for k in CHANNEL_OPTIONS})
        if values["target"] == "latency" and isinstance(values["latency_table"], (str, os.PathLike)):
            LatencyTable.load(values["latency_table"])  # a missing or broken file fails here, not later


def create(
    method: str, model: nn.Module, optimizer: torch.optim.Optimizer, **options: Any
) -> Optional[Sparsifier]:
    """The sparsifier ``method`` names on ``model`` (None for ``"dense"``); ``None`` options are left to the
    algorithm's default."""
    if method == "dense":
        return None
    kwargs: Mapping[str, Any] = {k: v for k, v in options.items() if v is not None}
    return _algorithm(method)(model, optimizer, **kwargs)
