"""The algorithms by name: what they are called, their defaults, and the validation of their options.

The library, the trainer's config and the CLI all read this one table, so a name, a default or a rule
lives in one place. An option given as ``None`` means "the algorithm's default".
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from chase.sparse.distribution import DISTRIBUTIONS
from chase.sparse.schedules import SWAP_SCHEDULES
from chase.sparsifier.algorithms import MEST, SET, RigL, Static
from chase.sparsifier.base import GROWTH, SCOPES, Sparsifier, check_options
from chase.sparsifier.chase import Chase
from chase.sparsifier.specs import flat_options, specs_from_flat

__all__ = [
    "ALGORITHMS",
    "CHANNEL_OPTIONS",
    "CHOICES",
    "METHODS",
    "check",
    "create",
    "defaults",
    "specs",
    "takes",
]

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
#: the options of channel pruning (:class:`~chase.ChannelSpec`, :class:`~chase.Budget`), by their flat
#: names: generated from the specs and the tables of rankings, budget kinds and cost models.
CHANNEL_OPTIONS: tuple[str, ...] = tuple(flat_options())
#: the allowed values of every option that is a choice.
CHOICES: dict[str, tuple[str, ...]] = {
    "distribution": tuple(DISTRIBUTIONS),
    "growth": tuple(GROWTH),
    "scope": tuple(SCOPES),
    "swap_schedule": tuple(SWAP_SCHEDULES),
    **{o.name: o.choices for o in flat_options().values() if o.choices},
}


def _algorithm(method: str) -> type[Sparsifier]:
    if method not in ALGORITHMS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return ALGORITHMS[method]


def _spec_keywords(cls: type[Sparsifier]) -> dict[str, type]:
    return dict(getattr(cls, "option_specs", {}))


def defaults(method: str) -> dict[str, Any]:
    """Every keyword option of ``method`` by its flat name, with its default (the class's own keywords,
    its preset values and the engine's, and the flat options of the specs it takes), e.g.
    ``defaults("chase")["update_every"] == 1000``; ``{}`` for ``"dense"``."""
    if method == "dense":
        return {}
    cls = _algorithm(method)
    specs = _spec_keywords(cls)
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" not in vars(klass):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind == p.KEYWORD_ONLY and p.default is not p.empty and p.name not in specs:
                out[p.name] = p.default
    if specs:
        out.update({o.name: o.default for o in flat_options().values()})
    out.update(cls.defaults)
    return out


#: keywords every algorithm takes without a default (``example_inputs`` for Chase only).
REQUIRED = ("density", "total_steps", "example_inputs")


def takes(method: str, keyword: str) -> bool:
    """Whether ``method``'s constructor takes ``keyword`` (e.g. ``example_inputs``: the algorithms that
    trace channel groups)."""
    if method == "dense":
        return False
    return keyword in inspect.signature(_algorithm(method).__init__).parameters


def specs(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The typed option families ``method`` takes (``{"channels": ChannelSpec, "budget": Budget}`` for
    Chase, ``{}`` otherwise), built from the flat ``options`` (``None``: the default)."""
    if method == "dense" or not _spec_keywords(_algorithm(method)):
        return {}
    channels, budget = specs_from_flat({k: v for k, v in options.items() if k in CHANNEL_OPTIONS})
    return {"channels": channels, "budget": budget}


def check(method: str, total_steps: Optional[int] = None, **options: Any) -> None:
    """Validate ``options`` of ``method`` without a model (``None`` values take the defaults): unknown
    options, options the method does not take, and values out of range raise ``ValueError`` naming the
    option, by the same rules the constructors apply. With ``total_steps`` the schedule is checked too
    (an exploration update after the soft bound's end, a channel event that fits, ...). ``"dense"``
    takes no option."""
    given = {k: v for k, v in options.items() if v is not None}
    if method == "dense":
        if given:
            raise ValueError(f"method 'dense' has no sparsifier, so no option {sorted(given)}")
        return
    cls = _algorithm(method)
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
    typed = specs(method, given)  # the specs validate themselves (a cost model's file is read here)
    if total_steps is not None:
        cls.check_schedule(total_steps, {**values, **typed})


def create(
    method: str, model: nn.Module, optimizer: torch.optim.Optimizer, **options: Any
) -> Optional[Sparsifier]:
    """The sparsifier ``method`` names on ``model`` (None for ``"dense"``); ``None`` options are left to the
    algorithm's default. Flat channel options (``channel_sparsity=0.5``) are built into the specs the
    algorithm takes; specs may also be given as they are (``channels=ChannelSpec(...)``)."""
    if method == "dense":
        return None
    kwargs = {k: v for k, v in options.items() if v is not None}
    flat = {k: kwargs.pop(k) for k in list(kwargs) if k in CHANNEL_OPTIONS}
    if flat:
        built = specs(method, flat)
        if not built:
            raise ValueError(f"method {method!r} has no option(s) {sorted(flat)} (options of Chase only)")
        clash = sorted(set(built) & set(kwargs))
        if clash:
            raise ValueError(f"give {clash[0]}= or its flat options {sorted(flat)}, not both")
        kwargs.update(built)
    return _algorithm(method)(model, optimizer, **kwargs)
