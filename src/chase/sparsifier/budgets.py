"""What a channel schedule counts: one small object per budget kind, in one table.

``channels`` counts prunable channels (``channel_sparsity``, the paper); every other kind is a measure of
the model (its MACs, parameters, predicted time) that the events bring to a ratio of the dense model's.
A kind measures the model as it is now and says what removing one channel (one unit) of each group saves,
in the same unit. Adding a kind is one class here and one entry in :data:`BUDGET_KINDS`: the budget spec,
the trainer's config (``<kind>_ratio``), the CLI flags and the docs read the table.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from chase.flops import count_flops

__all__ = ["BUDGET_KINDS", "BudgetKind", "Channels", "Latency", "Macs", "Params"]


class BudgetKind:
    """A budget kind.

    Class attributes:
        name: the ``target`` value; a kind with ``ratio`` gets the option ``<name>_ratio``.
        unit: what :meth:`measure` counts, for messages.
        ratio: whether the budget is a ratio of the dense model's measure (every kind but ``channels``).
        ratio_help: the help of ``<name>_ratio``.
        needs_cost: whether it needs a cost model (a latency table, a roofline) to measure.
        in_time: whether it counts time (a ranking weighing groups by time per unit is then uniform).
    """

    name: ClassVar[str] = ""
    unit: ClassVar[str] = ""
    ratio: ClassVar[bool] = True
    ratio_help: ClassVar[str] = ""
    needs_cost: ClassVar[bool] = False
    in_time: ClassVar[bool] = False

    def measure(self, pruner: Any, example: Any) -> int:
        """The model's measure now (an integer: budgets compare exactly)."""
        raise NotImplementedError

    def channel_costs(self, pruner: Any, example: Any) -> list[int]:
        """What removing one channel (unit) of each prunable group saves now (at least 1)."""
        raise NotImplementedError


class Channels(BudgetKind):
    name = "channels"
    unit = "channels"
    ratio = False

    def measure(self, pruner: Any, example: Any) -> int:
        return pruner.alive_total()

    def channel_costs(self, pruner: Any, example: Any) -> list[int]:
        return list(pruner.units)  # a grouped-conv unit counts its channels


class Macs(BudgetKind):
    name = "macs"
    unit = "MACs"
    ratio_help = "target=macs: the final model's GPU-supported MACs per example over the dense model's"

    def measure(self, pruner: Any, example: Any) -> int:
        return count_flops(pruner.module, example).dense

    def channel_costs(self, pruner: Any, example: Any) -> list[int]:
        # A weight's slice counts once per output position it is used at.
        positions = {layer.name: layer.positions for layer in count_flops(pruner.module, example).layers}
        return pruner.slice_costs(lambda name, tensor, numel: numel * positions.get(name, 0))


class Params(BudgetKind):
    name = "params"
    unit = "parameters"
    ratio_help = "target=params: the final model's parameters over the dense model's"

    def measure(self, pruner: Any, example: Any) -> int:
        return sum(p.numel() for p in pruner.module.parameters())

    def channel_costs(self, pruner: Any, example: Any) -> list[int]:
        return pruner.slice_costs(
            lambda name, tensor, numel: numel if isinstance(tensor, nn.Parameter) else 0
        )


class Latency(BudgetKind):
    name = "latency"
    unit = "ns predicted"
    ratio_help = (
        "target=latency: the final model's forward time, as the budget's cost model predicts it, over the "
        "dense model's"
    )
    needs_cost = True
    in_time = True

    def measure(self, pruner: Any, example: Any) -> int:
        # Nanoseconds: integers, like the other counts.
        return round(1e6 * pruner.cost.model_ms(pruner, example))

    def channel_costs(self, pruner: Any, example: Any) -> list[int]:
        return [max(1, round(1e6 * ms)) for ms in pruner.cost.channel_saving_ms(pruner, example)]


#: every budget kind by its ``target`` name.
BUDGET_KINDS: dict[str, BudgetKind] = {k.name: k for k in (Channels(), Macs(), Params(), Latency())}
