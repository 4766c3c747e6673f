"""The typed options of channel pruning: :class:`ChannelSpec` (what may shrink, how much, when, how channels
are scored and ranked, alignment, removal mode) and :class:`Budget` (what the schedule counts, its final
ratio, and the cost model that predicts time).

Each spec validates itself on construction with the messages users see, and each option carries its
one-line help. Everything else is generated from them: the flat option names (:func:`flat_options`) that
the trainer's config, the registry, the CLI flags of ``train/flops/bench/profile/check`` and the docs'
options table (:func:`options_markdown`) use. The budget's flat names come from the tables of budget kinds
(``target``, ``<kind>_ratio``) and cost models (``latency_table``), so adding a kind or a cost model adds
its option everywhere.

    chase.Chase(model, opt, density=0.1, total_steps=T, example_inputs=x,
                channels=ChannelSpec(channel_sparsity=0.5, prune_skip=True, channel_multiple=8),
                budget=Budget.macs(0.5))

The flat keyword arguments of earlier releases (``channel_sparsity=0.5, target="macs", macs_ratio=0.5``)
still work for one release, through :func:`resolve_specs`, which warns once.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from chase.sparse.channels import CHANNEL_SCORES
from chase.sparsifier.budgets import BUDGET_KINDS, BudgetKind
from chase.sparsifier.costs import COST_SOURCES, cost_model
from chase.sparsifier.rankings import RANKINGS, Ranking, ranking

__all__ = [
    "REMOVAL_MODES",
    "ROLES",
    "Budget",
    "ChannelSpec",
    "FlatOption",
    "check_specs",
    "flat_options",
    "options_markdown",
    "resolve_specs",
    "specs_from_flat",
]

REMOVAL_MODES = ("physical", "mask")
#: what an option is about; a command offers the roles it uses (``chase profile``: the groups only).
ROLES = {
    "groups": "which channels may be removed",
    "amount": "how many",
    "ranking": "which go first, and in what blocks",
    "schedule": "when (Chase's events)",
    "removal": "how they are removed while training",
    "budget": "what the schedule counts",
}


def _about(help: str, *, role: str, type: type, choices: Any = None, schedule: str = "") -> dict[str, Any]:
    """A spec field's metadata: its help, role, value type (for the config and the CLI), its choices (a
    table whose keys are the choices) and, for Chase's schedule, whether it is a ``"point"`` or an
    ``"interval"``."""
    return {"help": help, "role": role, "type": type, "choices": choices, "schedule": schedule}


@dataclass(frozen=True)
class ChannelSpec:
    """What channel pruning may remove, how much, when and how (one frozen value; refuses bad options on
    construction with ``ValueError`` naming the option).

    The fields keep the names the options have everywhere (the trainer's config, ``--channel-sparsity``).
    """

    channel_sparsity: float = field(
        default=0.4,
        metadata=_about(
            "final fraction of the prunable channels removed (the paper's S_c, 0.3-0.5); with a budget "
            "target it only sets the floors",
            role="amount",
            type=float,
        ),
    )
    min_channel_ratio: float = field(
        default=0.2,
        metadata=_about(
            "the paper's beta: a group keeps at least max(1, int(C (1 - channel_sparsity) beta)) channels",
            role="amount",
            type=float,
        ),
    )
    prune_skip: bool = field(
        default=False,
        metadata=_about(
            "also prune residual-stream channels (all coupled layers together)", role="groups", type=bool
        ),
    )
    prune_heads: bool = field(
        default=False,
        metadata=_about(
            "also remove whole attention heads (a head counts as its query width)", role="groups", type=bool
        ),
    )
    keep_channels: tuple[str, ...] = field(
        default=(),
        metadata=_about(
            "fnmatch patterns of layers whose output channels are never pruned (their whole group is kept; "
            "each pattern must match a prunable group), e.g. conv1",
            role="groups",
            type=list,
        ),
    )
    channel_score: str = field(
        default="umm",
        metadata=_about(
            "channel score: umm (the paper's unmasked mean magnitude), kept_mean or density (ablations)",
            role="ranking",
            type=str,
            choices=CHANNEL_SCORES,
        ),
    )
    channel_rank: str | Ranking = field(
        default="score",
        metadata=_about(
            "how an event orders the channels: "
            + "; ".join(f"{name} ({r.help})" for name, r in RANKINGS.items())
            + " (chase.sparsifier.rankings; a Ranking object in Python)",
            role="ranking",
            type=str,
            choices=RANKINGS,
        ),
    )
    channel_multiple: Optional[int] = field(
        default=None,
        metadata=_about(
            "after every event each prunable group keeps a multiple of this many channels (8 suits GPU "
            "tensor cores; a group narrower than it keeps its width); default 1, or the tile of the "
            "budget's roofline device",
            role="ranking",
            type=int,
        ),
    )
    channel_every: int = field(
        default=1000,
        metadata=_about(
            "optimizer steps between channel events (the paper's Delta T)",
            role="schedule",
            type=int,
            schedule="interval",
        ),
    )
    channel_end: int | float | None = field(
        default=None,
        metadata=_about(
            "when channel pruning ends (the paper's T_chan); default: with the soft bound, and before the "
            "last exploration update",
            role="schedule",
            type=float,
            schedule="point",
        ),
    )
    removal: str = field(
        default="physical",
        metadata=_about(
            "physical (slice channels out of the model and optimizer while training) or mask (zero them; "
            "sliced out at export)",
            role="removal",
            type=str,
            choices=REMOVAL_MODES,
        ),
    )

    def __post_init__(self) -> None:
        kept = self.keep_channels
        if not isinstance(kept, (list, tuple)) or not all(isinstance(k, str) for k in kept):
            raise ValueError(f"keep_channels must be a list of fnmatch patterns, got {self.keep_channels!r}")
        object.__setattr__(self, "keep_channels", tuple(self.keep_channels))
        _number("channel_sparsity", self.channel_sparsity)
        if not 0.0 <= self.channel_sparsity < 1.0:
            raise ValueError(f"channel_sparsity must be in [0, 1), got {self.channel_sparsity}")
        _number("min_channel_ratio", self.min_channel_ratio)
        if not 0.0 <= self.min_channel_ratio <= 1.0:
            raise ValueError(f"min_channel_ratio must be in [0, 1], got {self.min_channel_ratio}")
        for name in ("prune_skip", "prune_heads"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.channel_score not in CHANNEL_SCORES:
            raise ValueError(f"channel_score must be one of {CHANNEL_SCORES}, got {self.channel_score!r}")
        ranking(self.channel_rank)  # a known name or a Ranking
        for name in ("channel_multiple", "channel_every"):
            value = getattr(self, name)
            if value is None and name == "channel_multiple":
                continue
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        schedule_point("channel_end", self.channel_end)
        if self.removal not in REMOVAL_MODES:
            raise ValueError(f"removal must be one of {REMOVAL_MODES}, got {self.removal!r}")

    @property
    def ranking(self) -> Ranking:
        """The :class:`~chase.sparsifier.rankings.Ranking` that ``channel_rank`` names."""
        return ranking(self.channel_rank)

    def replace(self, **changes: Any) -> ChannelSpec:
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """The options that differ from the defaults, ``name=value`` (for labels and reports)."""
        return _describe(self)


@dataclass(frozen=True)
class Budget:
    """What the channel schedule counts, and its final value: ``target`` is a budget kind
    (:data:`chase.sparsifier.budgets.BUDGET_KINDS`: ``"channels"``, ``"macs"``, ``"params"``,
    ``"latency"``), ``ratio`` the final measure over the dense model's, in (0, 1) (none for
    ``"channels"``, whose amount is :attr:`ChannelSpec.channel_sparsity`), and ``cost`` a cost model that
    predicts time (:data:`chase.sparsifier.costs.COST_SOURCES`: a ``LatencyTable`` or its JSON file or
    dict, or a :class:`chase.sparsifier.roofline.Roofline` such as ``Roofline("h200")``): needed by
    ``target="latency"`` and by ``channel_rank="latency_weighted"``.

    Build one with :meth:`macs`, :meth:`params`, :meth:`latency` or :meth:`channels`.
    """

    target: str = "channels"
    ratio: Optional[float] = None
    cost: Any = None

    def __post_init__(self) -> None:
        kind = BUDGET_KINDS.get(self.target) if isinstance(self.target, str) else None
        if kind is None:
            raise ValueError(f"target must be one of {tuple(BUDGET_KINDS)}, got {self.target!r}")
        if kind.ratio:
            if isinstance(self.ratio, bool) or not (
                isinstance(self.ratio, numbers.Real) and 0.0 < self.ratio < 1.0
            ):
                raise ValueError(
                    f"target={self.target!r} needs {self.target}_ratio in (0, 1), got {self.ratio!r}"
                )
        elif self.ratio is not None:
            raise ValueError(
                f"target={self.target!r} takes no ratio (channel_sparsity is its amount), got {self.ratio}"
            )
        if self.cost is not None:
            object.__setattr__(self, "cost", cost_model(self.cost))
        elif kind.needs_cost:
            raise ValueError(f"target={self.target!r} needs {_cost_options()}")

    @property
    def kind(self) -> BudgetKind:
        return BUDGET_KINDS[self.target]

    @classmethod
    def channels(cls, cost: Any = None) -> Budget:
        """Count prunable channels (``ChannelSpec.channel_sparsity``), the paper's schedule; ``cost`` only
        for ``channel_rank="latency_weighted"``."""
        return cls("channels", None, cost)

    @classmethod
    def macs(cls, ratio: float, cost: Any = None) -> Budget:
        """Remove channels until the GPU-supported MACs per example are ``ratio`` of the dense model's."""
        return cls("macs", ratio, cost)

    @classmethod
    def params(cls, ratio: float, cost: Any = None) -> Budget:
        """Remove channels until the parameters are ``ratio`` of the dense model's."""
        return cls("params", ratio, cost)

    @classmethod
    def latency(cls, ratio: float, cost: Any) -> Budget:
        """Remove channels until the forward time ``cost`` predicts is ``ratio`` of the dense model's."""
        return cls("latency", ratio, cost)

    def describe(self) -> str:
        """``target=..., <kind>_ratio=...`` and the cost model's option (for labels and reports)."""
        if self.target == "channels" and self.cost is None:
            return ""
        parts = [f"target={self.target}"]
        if self.ratio is not None:
            parts.append(f"{self.target}_ratio={self.ratio:g}")
        if self.cost is not None:
            meta = getattr(self.cost, "meta", None) or {}
            where = [str(meta[k]) for k in ("name", "device", "dtype") if k in meta][:2]
            where += [f"batch {meta['batch_size']}"] if "batch_size" in meta else []
            where += [] if "fused" not in meta else ["fused" if meta["fused"] else "eager"]
            parts.append(_cost_name(self.cost) + (f" ({', '.join(where)})" if where else ""))
        return ", ".join(parts)


def check_specs(channels: ChannelSpec, budget: Budget) -> None:
    """The rules between the two specs (``ValueError`` naming the options)."""
    rank, kind = channels.ranking, budget.kind
    if rank.needs_budget and not kind.ratio:
        wanted = ", ".join(k for k, v in BUDGET_KINDS.items() if v.ratio)
        raise ValueError(f"channel_rank={rank.name!r} needs a budget target ({wanted})")
    if rank.needs_cost and budget.cost is None:
        raise ValueError(f"channel_rank={rank.name!r} needs {_cost_options()}")
    if budget.cost is not None:
        _check_cost_used(_cost_name(budget.cost), kind, rank, budget.target)
    if kind.ratio and channels.removal != "physical":
        raise ValueError(
            f"target={budget.target!r} needs removal='physical' (it measures the narrowed model)"
        )


# ---------------------------------------------------------------------------------------------- flat names
@dataclass(frozen=True)
class FlatOption:
    """One flat option (a config key, a ``--flag``), generated from the specs and the tables.

    Attributes:
        name: the option (``channel_sparsity``, ``macs_ratio``, ``latency_table``).
        help: its one-line help.
        role: a key of :data:`ROLES`.
        type: its value type in a config or on the command line: ``float``, ``int``, ``str``, ``bool`` or
            ``list`` (of strings).
        default: the library's default (None: none, or computed).
        choices: the allowed values of a choice.
        schedule: ``"point"`` or ``"interval"`` for Chase's schedule options ('' otherwise).
        metavar: what the value is, for the CLI.
    """

    name: str
    help: str
    role: str
    type: type
    default: Any = None
    choices: Optional[tuple[str, ...]] = None
    schedule: str = ""
    metavar: Optional[str] = None


def flat_options() -> dict[str, FlatOption]:
    """Every channel-pruning option by its flat name: :class:`ChannelSpec`'s fields, then the budget's
    ``target``, one ``<kind>_ratio`` per budget kind with a ratio and one option per cost model."""
    out: dict[str, FlatOption] = {}
    for f in dataclasses.fields(ChannelSpec):
        m = f.metadata
        choices = tuple(m["choices"]) if m["choices"] is not None else None
        out[f.name] = FlatOption(f.name, m["help"], m["role"], m["type"], f.default, choices, m["schedule"])
    kinds = tuple(BUDGET_KINDS)
    out["target"] = FlatOption(
        "target",
        "what the channel schedule counts: "
        + ", ".join(kinds)
        + " (channels: channel_sparsity of the prunable channels; the others: <target>_ratio of the dense "
        "model's measure; given a ratio alone, its kind)",
        "budget",
        str,
        "channels",
        kinds,
    )
    for name, kind in BUDGET_KINDS.items():
        if kind.ratio:
            out[f"{name}_ratio"] = FlatOption(
                f"{name}_ratio", kind.ratio_help + ", in (0, 1)", "budget", float
            )
    for name, source in COST_SOURCES.items():
        out[name] = FlatOption(name, source.help, "budget", str, metavar=source.metavar)
    return out


#: the flat option names (the keyword arguments the adapter takes).
FLAT_NAMES: frozenset[str] = frozenset(flat_options())


def specs_from_flat(values: Mapping[str, Any]) -> tuple[ChannelSpec, Budget]:
    """The specs that flat options describe (``None`` values: the default). A ratio alone names its budget
    kind; a ratio of another kind than ``target``, two ratios or two cost models are refused."""
    unknown = sorted(set(values) - FLAT_NAMES)
    if unknown:
        raise ValueError(f"unknown channel option(s) {unknown}; known: {sorted(FLAT_NAMES)}")
    given = {k: v for k, v in values.items() if v is not None}
    spec_fields = {f.name for f in dataclasses.fields(ChannelSpec)}
    channels = ChannelSpec(**{k: v for k, v in given.items() if k in spec_fields})
    ratios = {k: given[f"{k}_ratio"] for k, v in BUDGET_KINDS.items() if v.ratio and f"{k}_ratio" in given}
    costs = {k: given[k] for k in COST_SOURCES if k in given}
    if len(costs) > 1:
        raise ValueError(f"{' and '.join(costs)} given: a budget takes one cost model")
    target = given.get("target")
    if target is None:
        if len(ratios) > 1:
            raise ValueError(f"{' and '.join(f'{k}_ratio' for k in ratios)} given: one budget at a time")
        target = next(iter(ratios), "channels")
    other = [f"{k}_ratio" for k in ratios if k != target]
    if other:
        raise ValueError(f"{', '.join(other)} given, but target={target!r} does not use it")
    cost = None
    for name, value in costs.items():  # said unused before it is read (it may be no table at all)
        _check_cost_used(name, BUDGET_KINDS.get(target), channels.ranking, target)
        cost = COST_SOURCES[name].load(value)
    budget = Budget(target, ratios.get(target), cost)
    check_specs(channels, budget)
    return settled(channels, budget), budget


_WARNED: set[str] = set()


def _outside_chase() -> int:
    """The stacklevel of the first caller outside this package and torch's decorators (``@torch.no_grad``
    wraps some callers), so a warning names the user's line."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not name.startswith(package + os.sep) and not name.endswith(
            os.path.join("torch", "utils", "_contextlib.py")
        ):
            return level
        frame, level = frame.f_back, level + 1
    return level


def resolve_specs(
    channels: Optional[ChannelSpec],
    budget: Optional[Budget],
    flat: Mapping[str, Any],
    *,
    caller: str,
) -> tuple[ChannelSpec, Budget]:
    """The specs a function was given: ``channels`` and ``budget`` (defaults when None), or, from earlier
    releases, the flat keyword arguments ``flat`` (deprecated: a ``FutureWarning`` once per ``caller``).
    Both at once are refused."""
    if flat:
        if channels is not None or budget is not None:
            raise ValueError(f"{caller}: give channels=/budget= or the flat options {sorted(flat)}, not both")
        if caller not in _WARNED:
            _WARNED.add(caller)
            warnings.warn(
                f"{caller}: flat channel options ({', '.join(sorted(flat))}) are deprecated and will be "
                "removed in the next release; pass channels=chase.ChannelSpec(...) and budget=chase.Budget"
                ".macs(...) (or .params/.latency)",
                FutureWarning,
                stacklevel=_outside_chase(),
            )
        return specs_from_flat(flat)
    channels = ChannelSpec() if channels is None else channels
    budget = Budget() if budget is None else budget
    if not isinstance(channels, ChannelSpec):
        raise TypeError(f"{caller}: channels must be a chase.ChannelSpec, got {type(channels).__name__}")
    if not isinstance(budget, Budget):
        raise TypeError(f"{caller}: budget must be a chase.Budget, got {type(budget).__name__}")
    check_specs(channels, budget)
    return settled(channels, budget), budget


def settled(channels: ChannelSpec, budget: Budget) -> ChannelSpec:
    """``channels`` with what it leaves to the budget decided: ``channel_multiple`` unset becomes the
    tile of the budget's cost model (a roofline's device: 8 for GPU tensor cores), else 1."""
    if channels.channel_multiple is not None:
        return channels
    return channels.replace(channel_multiple=int(getattr(budget.cost, "tile", 1) or 1))


def schedule_point(name: str, value: Any) -> None:
    """Refuse a schedule point that is neither None, an optimizer step (an integer >= 0) nor a fraction of
    the run (a float in [0, 1])."""
    if value is None:
        return
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{name} must be a step >= 0 or a fraction of the run in [0, 1], got {value}")
        return
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(
                f"{name}={value} as a float is a fraction of the run and must be in [0, 1] (an int is a step)"
            )
        return
    raise ValueError(
        f"{name} must be an optimizer step (int) or a fraction of the run (float), got {value!r}"
    )


# ---------------------------------------------------------------------------------------------- docs
def options_markdown() -> str:
    """The options table of the docs: every flat option with its default, values and help, by role."""
    lines = ["| option | default | values | what it does |", "|---|---|---|---|"]
    for role, about in ROLES.items():
        for o in flat_options().values():
            if o.role != role:
                continue
            default = (
                "-"
                if o.default is None
                else f"`{list(o.default) if isinstance(o.default, tuple) else o.default}`"
            )
            values = ", ".join(f"`{c}`" for c in o.choices) if o.choices else o.type.__name__
            if o.schedule == "point":  # the unit is the caller's: the trainer takes fractions only
                values = "optimizer step (int) or fraction of the run (float, e.g. 0.8)"
            lines.append(f"| `{o.name}` | {default} | {values} | {about}: {o.help} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- helpers
def _number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")


def _check_cost_used(name: str, kind: Optional[BudgetKind], rank: Ranking, target: Any) -> None:
    if (kind is not None and kind.needs_cost) or rank.needs_cost:
        return
    users = [f"target={k!r}" for k, v in BUDGET_KINDS.items() if v.needs_cost]
    users += [f"channel_rank={k!r}" for k, v in RANKINGS.items() if v.needs_cost]
    raise ValueError(
        f"{name} given, but neither target={target!r} nor channel_rank={rank.name!r} uses it "
        f"({' or '.join(users)} do)"
    )


def _cost_name(cost: Any) -> str:
    return next((s.name for s in COST_SOURCES.values() if isinstance(cost, s.type)), type(cost).__name__)


def _cost_options() -> str:
    return " or ".join(f"{s.name} ({s.what})" for s in COST_SOURCES.values())


def _describe(spec: Any) -> str:
    parts = []
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if value != f.default and not (f.name == "channel_multiple" and value == 1):
            if isinstance(value, Ranking):  # a table entry by its name, a parametrised one in full
                value = value.name if RANKINGS.get(value.name) is value else repr(value)
            shown = value
            parts.append(f"{f.name}={list(shown) if isinstance(shown, tuple) else shown}")
    return ", ".join(parts)
