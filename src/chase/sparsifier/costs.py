"""Cost models: what predicts a model's time at given widths, for latency budgets and latency-weighted
rankings. One table, :data:`COST_SOURCES`, names each kind of cost model; its name is the option that
gives one (``latency_table=FILE``), in the budget spec, the trainer's config and the CLI.

A cost model answers, for a :class:`~chase.sparsifier.pruner.ChannelPruner` (its module, groups and alive
widths) and a one-example input:

- ``model_ms(pruner, example)``: the model's forward time now (ms);
- ``channel_saving_ms(pruner, example)``: per prunable group, what one more channel (unit) removed saves
  now (a roofline counts it over a step of its device's tile);
- ``mean_saving_ms(pruner, example)``: per group, what a channel saves on average from the dense width
  (what ``channel_rank="latency_weighted"`` weighs groups by, once, at the start of a run);
- ``check(pruner, example)``: refuse (``ValueError``) a model it was not made for;
- ``to_dict()`` / ``from_dict()``: its state, saved with the sparsifier's so a resume prunes by it;
- ``dense_ms``: the dense model's predicted time;
- ``meta``: where it holds: ``device``, ``dtype``, ``batch_size`` (the trainer times the final model there).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from chase.sparsifier.latency import LatencyTable
from chase.sparsifier.roofline import DEVICES, Roofline, read_device, split_option

__all__ = [
    "COST_SOURCES",
    "CostModel",
    "CostSource",
    "cost_from_state",
    "cost_model",
    "cost_state",
    "describe_cost",
]


@runtime_checkable
class CostModel(Protocol):
    meta: dict[str, Any]
    dense_ms: float

    def check(self, pruner: Any, example: Any) -> None: ...

    def model_ms(self, pruner: Any, example: Any) -> float: ...

    def channel_saving_ms(self, pruner: Any, example: Any) -> list[float]: ...

    def mean_saving_ms(self, pruner: Any, example: Any) -> list[float]: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class CostSource:
    """One kind of cost model.

    Attributes:
        name: the option that gives one (``latency_table``).
        type: its class (with ``from_dict``).
        load: builds one from the option's value (a file, a dict, a preset name, or the object itself).
        help: the option's one-line help.
        what: what to give, for messages ("a file `chase profile` wrote, or its dict").
        label: what one is called in messages ("latency table").
        metavar: what the option's value is, for the CLI.
    """

    name: str
    type: type
    load: Callable[[Any], Any]
    help: str
    what: str
    label: str
    metavar: str = "VALUE"


def _load_table(value: Any) -> LatencyTable:
    """A latency table from its file or dict; a roofline's device (a preset name, or a file `chase profile
    --roofline` wrote) given instead is named as one."""
    if isinstance(value, (str, os.PathLike)) and _is_roofline(value):
        raise ValueError(
            f"{str(value)!r} is a roofline's device, not a latency table: give "
            f"Roofline.parse({str(value)!r}) (chase.sparsifier.roofline), roofline={value} in a config or "
            f"--roofline {value}"
        )
    return LatencyTable.load(value)


def _is_roofline(value: str | os.PathLike) -> bool:
    device = split_option(str(value))[0]
    if not os.path.exists(device):
        return device in DEVICES
    try:  # a device file, read as the roofline reads it
        read_device(device)
    except ValueError:
        return False
    return True


#: every kind of cost model by the option that gives it.
COST_SOURCES: dict[str, CostSource] = {
    s.name: s
    for s in (
        CostSource(
            "latency_table",
            LatencyTable,
            _load_table,
            "a latency table `chase profile` measured for this model on the target device (JSON file): "
            "for target=latency and channel_rank=latency_weighted",
            "a file `chase profile` wrote, or its dict",
            "latency table",
            "FILE",
        ),
        CostSource(
            "roofline",
            Roofline,
            Roofline.parse,
            "a roofline of the device the model will run on: FLOPs and bytes moved per kernel, with launch "
            f"overhead (chase.sparsifier.roofline): a preset ({', '.join(DEVICES)}) or a file `chase profile "
            "--roofline` measured, then :fused (default) or :eager, and @BATCH (default 32), e.g. h200@256; "
            "for target=latency and channel_rank=latency_weighted; the default channel_multiple becomes the "
            "device's tile",
            f"a device ({', '.join(DEVICES)}) or a file `chase profile --roofline` wrote",
            "roofline",
            "DEVICE",
        ),
    )
}


def cost_model(value: Any) -> CostModel:
    """The cost model ``value`` gives: a cost model object as it is; a file or a dict: a latency table."""
    if isinstance(value, CostModel):
        return value
    if isinstance(value, (str, os.PathLike, Mapping)):
        return _load_table(value)
    raise ValueError(
        f"a cost model must be one of {', '.join(s.type.__name__ for s in COST_SOURCES.values())} (or a "
        f"latency table's JSON file or dict), got {type(value).__name__}"
    )


def describe_cost(cost: Any) -> str:
    """What ``cost`` is called in messages ("latency table"; "cost model" when it is not in the table)."""
    return next((s.label for s in COST_SOURCES.values() if isinstance(cost, s.type)), "cost model")


def cost_state(cost: CostModel) -> dict[str, Any]:
    """``cost`` as plain data (its source's name and ``to_dict()``), for a sparsifier's state."""
    source = next((s.name for s in COST_SOURCES.values() if isinstance(cost, s.type)), None)
    if source is None:
        raise ValueError(
            f"{type(cost).__name__} is not in chase.sparsifier.costs.COST_SOURCES: it cannot be saved"
        )
    return {"source": source, "data": cost.to_dict()}


def cost_from_state(state: Mapping[str, Any]) -> CostModel:
    """The cost model :func:`cost_state` saved."""
    source = COST_SOURCES.get(state.get("source", ""))
    if source is None:
        raise ValueError(
            f"unknown cost model {state.get('source')!r} in a saved state; known: {list(COST_SOURCES)}"
        )
    return source.type.from_dict(state["data"])
