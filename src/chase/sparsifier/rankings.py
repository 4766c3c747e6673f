"""How a channel event orders the alive channels: one small object per ranking, in one table.

A ranking turns the channels' scores into keys; the event removes the lowest keys first, by the same
water-filling under the floors (and alignment) whatever the ranking. Adding a ranking is one class here
and one entry in :data:`RANKINGS`; the option checks, the trainer's config, the CLI and the tests read the
table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

__all__ = [
    "RANKINGS",
    "LatencyWeighted",
    "Normalized",
    "RankContext",
    "Ranking",
    "Score",
    "ScorePerCost",
    "Uniform",
    "ranking",
]


@dataclass(frozen=True)
class RankContext:
    """What a ranking sees at one event.

    Attributes:
        scores: every alive channel's score (float32, CPU), group after group.
        gids: the group index of each entry of ``scores``.
        alive: alive channels (units) per group, before this event.
        widths: each group's original width.
        costs: what one channel (unit) of each group is worth in the budget's unit (channels, MACs,
            parameters or predicted ns).
        weights: the per-group weights :meth:`Ranking.weights` fixed at the start of the run (or None).
    """

    scores: torch.Tensor
    gids: torch.Tensor
    alive: Sequence[int]
    widths: Sequence[int]
    costs: Sequence[int]
    weights: Optional[Sequence[float]] = None


class Ranking:
    """A channel ranking: :meth:`keys` orders the channels (lowest removed first).

    Class attributes:
        needs_budget: only meaningful with a budget target (MACs, params, latency).
        needs_cost: needs a cost model (a latency table, a roofline) on the budget.
    """

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    needs_budget: ClassVar[bool] = False
    needs_cost: ClassVar[bool] = False

    def weights(self, pruner: Any, kind: Any, example: Any) -> Optional[list[float]]:
        """Per-group weights fixed once, on the dense model at the start of a run (saved in the
        sparsifier's state so that a resume keeps them); None when the ranking has none."""
        return None

    def keys(self, ctx: RankContext) -> torch.Tensor:
        raise NotImplementedError


class Score(Ranking):
    name = "score"
    help = "lowest score first, across all groups (the paper's global ranking)"

    def keys(self, ctx: RankContext) -> torch.Tensor:
        return ctx.scores


class ScorePerCost(Ranking):
    name = "score_per_cost"
    help = (
        "budget targets only: lowest score per unit of the budget a channel saves first (a greedy knapsack: "
        "the least score given up for what is saved)"
    )
    needs_budget = True

    def keys(self, ctx: RankContext) -> torch.Tensor:
        # Only the order matters to the water-filling, so no normalisation.
        return ctx.scores / torch.as_tensor(ctx.costs, dtype=torch.float)[ctx.gids]


class Normalized(Ranking):
    name = "normalized"
    help = (
        "score over the mean score of its group's alive channels: every group loses channels at a similar "
        "rate, its lowest-scored ones"
    )

    def keys(self, ctx: RankContext) -> torch.Tensor:
        # A layer whose weights are small across the board (sparser under ERK, usually deeper) is not
        # emptied before the others are touched.
        n = len(ctx.alive)
        sums = torch.zeros(n).index_add_(0, ctx.gids, ctx.scores)
        means = sums / torch.bincount(ctx.gids, minlength=n).clamp(min=1)
        return ctx.scores / means.clamp(min=torch.finfo(torch.float).tiny)[ctx.gids]


class Uniform(Ranking):
    name = "uniform"
    help = "every group loses the same share of its channels, its lowest-scored ones (layer-wise pruning)"

    def keys(self, ctx: RankContext) -> torch.Tensor:
        return _share_keys(ctx.scores, ctx.gids, ctx.alive, ctx.widths)


@dataclass(frozen=True)
class LatencyWeighted(Uniform):
    """Uniform pruning in which a group's share grows with its time per unit of the budget.

    Args:
        exponent: a group's share of removals goes as (its ms per unit of the budget) ** exponent. 0 would
            be uniform widths; 1 takes a group whose channels are 4x as slow per MAC to 4x the share. On
            this project's 2-core CPU (ResNet-50 at MACs 0.5, m = 8, batch 32, fp32, its eager table;
            benchmarks/results/channel_latency_exponent_cpu_r50.md) 0.25 / 0.5 / 0.75 / 1 ran 1.93x /
            2.06x / 2.19x / 2.16x the dense model's speed compiled and 2.29x / 3.08x / 3.61x / 3.33x eager;
            from 0.75 on, the stem kept 8 of 64 channels and layer1's residual stream 24 of 256 (near their
            floors), at 0.5 24 and 64.
        noise_floor: a group whose measured line is flat or falling (profile noise, not a free group) is
            weighed at this fraction of the median weight: with the exponent 0.5 it loses a tenth of a
            median group's share rather than none.
    """

    name = "latency_weighted"
    help = (
        "as uniform, but a group's share grows with the square root of its time per unit of the budget, "
        "by the budget's cost model (latency table or roofline): layers slow for their cost give more; "
        "under a latency budget it is uniform"
    )
    needs_cost = True
    exponent: float = 0.5
    noise_floor: float = 1e-2

    def __post_init__(self) -> None:
        if not self.exponent >= 0:
            raise ValueError(f"LatencyWeighted exponent must be >= 0, got {self.exponent}")

    def weights(self, pruner: Any, kind: Any, example: Any) -> list[float]:
        """Each group's time per channel (the cost model's average over the dense model's widths) over
        what a channel costs in the budget's unit. Fixed once, not per event: a table times a group
        narrowed alone, so set against costs that fall as the neighbouring groups narrow, its slope
        would feed back and drive the slowest groups to their floors."""
        if kind.in_time:  # the budget is time itself: every group weighs the same
            return [1.0] * len(pruner.groups)
        per_channel = pruner.cost.mean_saving_ms(pruner, example)
        costs = kind.channel_costs(pruner, example)
        weights = [ms / cost for ms, cost in zip(per_channel, costs)]
        positive = sorted(w for w in weights if w > 0)
        floor = self.noise_floor * positive[len(positive) // 2] if positive else 1.0
        return [max(w, floor) for w in weights]

    def keys(self, ctx: RankContext) -> torch.Tensor:
        if ctx.weights is None:
            raise RuntimeError("channel_rank='latency_weighted' needs its weights (ChannelPruner.use_cost)")
        weights = torch.as_tensor(list(ctx.weights), dtype=torch.float)
        return super().keys(ctx) / weights.pow(self.exponent)[ctx.gids]


#: every ranking by name; ``channel_rank`` takes a name or a :class:`Ranking` object (e.g.
#: ``LatencyWeighted(exponent=0.75)``).
RANKINGS: dict[str, Ranking] = {
    r.name: r for r in (Score(), ScorePerCost(), Normalized(), Uniform(), LatencyWeighted())
}


def ranking(value: Any) -> Ranking:
    """The :class:`Ranking` a ``channel_rank`` value names (a name of :data:`RANKINGS`, or a ranking)."""
    if isinstance(value, Ranking):
        return value
    if isinstance(value, str) and value in RANKINGS:
        return RANKINGS[value]
    raise ValueError(f"channel_rank must be one of {tuple(RANKINGS)} or a Ranking, got {value!r}")


def _share_keys(
    scores: torch.Tensor, gids: torch.Tensor, alive: Sequence[int], widths: Sequence[int]
) -> torch.Tensor:
    """Ranking keys that remove the same share of every group: a channel's key is the share of its group's
    original width gone once it goes (after the group's lower-scored channels), so every prefix of the
    global order takes about the same share of each group, lowest scores first within a group."""
    keys = torch.empty_like(scores)
    for i, (a, width) in enumerate(zip(alive, widths)):
        pos = (gids == i).nonzero().squeeze(1)
        order = torch.argsort(scores[pos], stable=True)
        gone = width - a  # removed at earlier events
        keys[pos[order]] = (gone + torch.arange(1, pos.numel() + 1, dtype=scores.dtype)) / width
    return keys
