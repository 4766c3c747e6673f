"""Global channel pruning: the prunable channel groups of a model, their floors and scores, and the removal
of the lowest-scoring channels. Chase runs it at every channel event; :func:`prune_channels` once."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from chase.flops import count_flops
from chase.graph import ChannelGraph, channel_groups, unwrap_model
from chase.graph.types import ChannelGroup
from chase.sparse.channels import CHANNEL_SCORES, aligned_blocks, channel_score, water_fill
from chase.sparse.distribution import layer_counts, random_masks
from chase.sparse.targets import find_sparse_params, matches
from chase.sparsifier.dry_run import breaking_groups
from chase.sparsifier.latency import LatencyTable
from chase.surgery import SurgeryState, removal_problem, remove_channels, zero_removed
from chase.surgery.state import _lookup_tensor

log = logging.getLogger(__name__)

__all__ = [
    "INIT_DENSITY",
    "REMOVAL_MODES",
    "ChannelPruner",
    "PrunedChannels",
    "check_channel_options",
    "prune_channels",
    "untrained_label",
    "untrained_slim",
]

REMOVAL_MODES = ("physical", "mask")
#: what the channel schedule counts: prunable channels (S_c), or the model's MACs or parameters.
TARGETS = ("channels", "macs", "params", "latency")
#: how an event ranks channels: by score alone (the paper); under a budget target, by score per unit of
#: the budget a channel saves (a greedy knapsack: the least score given up for what is saved); or by score
#: over its group's mean score (every group loses channels at a similar rate, lowest scores first); or
#: uniformly (every group loses the same share of its channels, its lowest-scored ones); or uniformly
#: weighted by measured time (a group's share grows with its time per unit of the budget, by a latency
#: table: layers slow for what they count, e.g. memory-bound early convolutions, give more).
CHANNEL_RANKS = ("score", "score_per_cost", "normalized", "uniform", "latency_weighted")
#: ``"latency_weighted"``: a group's share of removals goes as (its ms per unit of the budget) ** this. 0
#: would be uniform widths; 1 takes a group whose channels are 4x as slow per MAC to 4x the share. On this
#: project's 2-core CPU (ResNet-50 at MACs 0.5, m = 8, batch 32, fp32, its eager table;
#: benchmarks/results/channel_latency_exponent_cpu_r50.md) 0.25 / 0.5 / 0.75 / 1 ran 1.93x / 2.06x / 2.19x
#: / 2.16x the dense model's speed compiled and 2.29x / 3.08x / 3.61x / 3.33x eager; from 0.75 on, the stem
#: kept 8 of 64 channels and layer1's residual stream 24 of 256 (near their floors), at 0.5 24 and 64.
LATENCY_WEIGHT_EXPONENT = 0.5
#: density at which an untrained width is chosen: the paper's d (what Chase sees at its first event).
INIT_DENSITY = 0.1


def check_channel_options(
    *,
    channel_sparsity: float,
    min_channel_ratio: float,
    removal: str = "physical",
    channel_score: str = "umm",
    channel_every: int = 1,
    channel_multiple: int = 1,
    target: str = "channels",
    macs_ratio: Optional[float] = None,
    params_ratio: Optional[float] = None,
    latency_ratio: Optional[float] = None,
    latency_table: Any = None,
    channel_rank: str = "score",
) -> None:
    """The one validation of the channel-pruning options (``ValueError`` naming the option)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if channel_rank not in CHANNEL_RANKS:
        raise ValueError(f"channel_rank must be one of {CHANNEL_RANKS}, got {channel_rank!r}")
    if channel_rank == "score_per_cost" and target == "channels":
        raise ValueError("channel_rank='score_per_cost' needs a budget target (macs, params or latency)")
    if channel_rank == "latency_weighted" and latency_table is None:
        raise ValueError(
            "channel_rank='latency_weighted' needs latency_table (a file `chase profile` wrote, or its dict)"
        )
    ratio = {"macs": macs_ratio, "params": params_ratio, "latency": latency_ratio}.get(target)
    if target == "latency" and latency_table is None:
        raise ValueError("target='latency' needs latency_table (a file `chase profile` wrote, or its dict)")
    if target != "channels" and (ratio is None or not 0.0 < ratio < 1.0):
        raise ValueError(f"target={target!r} needs {target}_ratio in (0, 1), got {ratio}")
    given = {
        k: v
        for k, v in (
            ("macs_ratio", macs_ratio),
            ("params_ratio", params_ratio),
            ("latency_ratio", latency_ratio),
        )
        if v is not None and k != f"{target}_ratio"
    }
    if given:
        raise ValueError(f"{', '.join(given)} given, but target={target!r} does not use it")
    if latency_table is not None and target != "latency" and channel_rank != "latency_weighted":
        raise ValueError(
            f"latency_table given, but neither target={target!r} nor channel_rank={channel_rank!r} uses it "
            "(target='latency' or channel_rank='latency_weighted' do)"
        )
    if target != "channels" and removal != "physical":
        raise ValueError(f"target={target!r} needs removal='physical' (it measures the narrowed model)")
    if not isinstance(channel_multiple, int) or isinstance(channel_multiple, bool) or channel_multiple < 1:
        raise ValueError(f"channel_multiple must be an integer >= 1, got {channel_multiple!r}")
    if channel_every < 1:
        raise ValueError(f"channel_every must be >= 1, got {channel_every}")
    if not 0.0 <= channel_sparsity < 1.0:
        raise ValueError(f"channel_sparsity must be in [0, 1), got {channel_sparsity}")
    if not 0.0 <= min_channel_ratio <= 1.0:
        raise ValueError(f"min_channel_ratio must be in [0, 1], got {min_channel_ratio}")
    if removal not in REMOVAL_MODES:
        raise ValueError(f"removal must be one of {REMOVAL_MODES}, got {removal!r}")
    if channel_score not in CHANNEL_SCORES:
        raise ValueError(f"channel_score must be one of {CHANNEL_SCORES}, got {channel_score!r}")


class ChannelPruner:
    """The channel side of Chase on one model.

    Finds the prunable channel groups whose producers are among ``params`` (minus ``keep_channels``,
    minus groups some module cannot follow or whose removal breaks the forward pass: those are refused
    with a warning), and removes channels by global score with per-group floors
    ``int(C (1 - channel_sparsity) min_channel_ratio)`` (at least 1).

    Args:
        module: the (unwrapped) model.
        example_inputs: an input batch on the model's device and dtype, used to trace the groups.
        params: the weights that are scored (name -> parameter), usually the sparse layers.
        channel_sparsity, min_channel_ratio, prune_skip, prune_heads, keep_channels, removal,
            channel_multiple, channel_rank: as for :class:`~chase.Chase`.
    """

    def __init__(
        self,
        module: nn.Module,
        example_inputs: Any,
        params: Mapping[str, torch.Tensor],
        *,
        channel_sparsity: float,
        min_channel_ratio: float = 0.2,
        prune_skip: bool = False,
        prune_heads: bool = False,
        keep_channels: Sequence[str] = (),
        removal: str = "physical",
        channel_multiple: int = 1,
        channel_rank: str = "score",
    ) -> None:
        self.module = module
        self.removal = removal
        self.channel_multiple = int(channel_multiple)
        self.channel_rank = channel_rank
        #: the measured latency table of ``target="latency"`` and ``channel_rank="latency_weighted"`` (set
        #: by its user).
        self.latency: Optional[LatencyTable] = None
        #: ``channel_rank="latency_weighted"``: each group's time per unit of the budget (see
        #: :meth:`use_latency_table`), fixed at the start of a run.
        self.latency_weights: Optional[list[float]] = None
        self.graph: ChannelGraph = channel_groups(
            module, example_inputs, prune_skip=prune_skip, prune_heads=prune_heads
        )
        groups = [g for g in self.graph.prunable() if any(s.tensor in params for s in g.producers)]
        self.groups = _without_kept(groups, keep_channels)
        inexact = [g.name for g in self.groups if not g.exact]
        if removal == "mask" and inexact:
            raise ValueError(
                f"removal='mask' cannot represent removing channels that pass through a channel-mixing norm "
                f"(LayerNorm/GroupNorm over channels) in group(s) {inexact[:3]}: zeroed channels would still "
                "count in its statistics. Use removal='physical' (default) or prune_skip=False"
            )
        self.surgery = SurgeryState(module, self.groups)
        # A group whose removal some module cannot follow (a custom module recording its width, say) or
        # that breaks the forward pass (a width held in Python, e.g. a reshape to another tensor's size)
        # is refused now, with the reason, rather than failing at the first channel event.
        refused = {g.name: why for g in self.groups if (why := removal_problem(module, self.surgery, g.name))}
        left = [g for g in self.groups if g.name not in refused]
        for name, error in breaking_groups(module, left, example_inputs).items():
            refused[name] = f"removing a channel breaks the forward pass ({error})"
        if refused:
            warnings.warn(
                f"Chase keeps {len(refused)} channel group(s) whose layers cannot be narrowed: "
                + "; ".join(f"{n}: {why}" for n, why in list(refused.items())[:3])
                + (" ..." if len(refused) > 3 else ""),
                stacklevel=4,
            )
            self.groups = [g for g in self.groups if g.name not in refused]
            self.surgery = SurgeryState(module, self.groups)
        #: group name -> why its channels are kept.
        self.refused_groups: dict[str, str] = refused
        # A grouped conv's channels go in units of `unit` channels (see the graph); sparsity counts channels.
        self.units = [g.unit for g in self.groups]
        self.total_channels = sum(g.width * u for g, u in zip(self.groups, self.units))
        # The paper's floor int(C (1 - S_c) beta), and never an empty layer.
        self.floors = [max(1, int(g.width * (1 - channel_sparsity) * min_channel_ratio)) for g in self.groups]
        # Filter size of each producer before any input channel was removed: UMM divides by it.
        self.row_numel = {s.tensor: params[s.tensor][0].numel() for g in self.groups for s in g.producers}

    # ------------------------------------------------------------------ read-outs
    def alive_channels(self) -> dict[str, int]:
        """Alive channels (units, for a group of grouped-conv units) per prunable group."""
        return {g.name: self.surgery.current_width(g.name) for g in self.groups}

    def alive_total(self) -> int:
        """Alive prunable channels, every unit counted with its channels."""
        return sum(self.surgery.current_width(g.name) * u for g, u in zip(self.groups, self.units))

    def channel_sparsity_now(self) -> float:
        """Fraction of prunable channels removed so far."""
        return 1.0 - self.alive_total() / self.total_channels if self.total_channels else 0.0

    # ------------------------------------------------------------------ budgets
    def measure(self, quantity: str, example_inputs: Any) -> int:
        """The model's ``"macs"`` (GPU-supported, per example, as :func:`chase.count_flops` counts them) or
        ``"params"`` now."""
        if quantity == "params":
            return sum(p.numel() for p in self.module.parameters())
        if quantity == "latency":  # nanoseconds predicted by the table: integers, like the other counts
            return round(1e6 * self._table().predict_ms(self.alive_channels()))
        return count_flops(self.module, example_inputs).dense

    def use_latency_table(self, source: Any, quantity: str, example_inputs: Any) -> None:
        """Predict latency with ``source`` (a table, its dict or JSON file); it must hold every group, at
        its full width, and have been measured on a model with this one's parameter count. With
        ``channel_rank="latency_weighted"`` also fix the weights for the budget ``quantity``
        (:meth:`_weigh_by_latency`), on the model as it is now: dense, at the start of a run."""
        table = LatencyTable.load(source)
        table.check_groups({g.name: g.width for g in self.groups}, params=self.measure("params", None))
        self.latency = table
        if self.channel_rank == "latency_weighted":
            self._weigh_by_latency(quantity, example_inputs)

    def _weigh_by_latency(self, quantity: str, example_inputs: Any) -> None:
        """Each group's time per channel (the table's mean slope over its measured widths) over what a
        channel costs in ``quantity`` (``"channels"``, ``"macs"``, ``"params"``; ``"latency"``: every
        weight 1). Fixed once, not per event: the table times a group narrowed alone, so set against costs
        that fall as the neighbouring groups narrow, its slope would feed back and drive the slowest groups
        to their floors."""
        if quantity == "latency":
            self.latency_weights = [1.0] * len(self.groups)
            return
        table = self._table()
        costs = self.units if quantity == "channels" else self.channel_costs(quantity, example_inputs)
        weights = [table.mean_channel_ms(g.name) / cost for g, cost in zip(self.groups, costs)]
        # A flat or falling line is the profile's noise, not a free group: it loses a tenth of the share
        # of a median group (weight 1/100: the share goes as the weight's square root) rather than none.
        positive = sorted(w for w in weights if w > 0)
        floor = 1e-2 * positive[len(positive) // 2] if positive else 1.0
        self.latency_weights = [max(w, floor) for w in weights]

    def _table(self) -> LatencyTable:
        if self.latency is None:
            raise ValueError("target='latency' and channel_rank='latency_weighted' need a latency table")
        return self.latency

    def channel_costs(self, quantity: str, example_inputs: Any) -> list[int]:
        """What removing one channel (one unit of a grouped conv) of each group saves now, in ``"macs"``
        per example or ``"params"``: every tensor slice the channel owns (its producer's filter, its
        consumers' input columns, norm entries), a weight's slice times the positions it is used at."""
        if quantity == "latency":
            table, alive = self._table(), self.alive_channels()
            return [max(1, round(1e6 * table.channel_ms(g.name, alive[g.name]))) for g in self.groups]
        positions: dict[str, int] = {}
        if quantity == "macs":
            report = count_flops(self.module, example_inputs)
            positions = {layer.name: layer.positions for layer in report.layers}
        costs = []
        for g in self.groups:
            total = 0.0
            for slot in g.slots:
                tensor = _lookup_tensor(self.module, slot.tensor)
                per_position = tensor.numel() / max(1, tensor.shape[slot.dim]) * slot.index.shape[1]
                if quantity == "params":
                    total += per_position if isinstance(tensor, nn.Parameter) else 0.0
                else:
                    total += per_position * positions.get(slot.tensor, 0)
            costs.append(max(1, round(total)))
        return costs

    @torch.no_grad()
    def remove_to_budget(
        self,
        quantity: str,
        target: int,
        example_inputs: Any,
        params: Mapping[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
        *,
        score: str = "umm",
        optimizer: Optional[torch.optim.Optimizer] = None,
        agree: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        rounds: int = 8,
    ) -> int:
        """Remove the lowest-score channels until the model's ``quantity`` (``"macs"`` or ``"params"``) is
        at most ``target``: each round predicts the savings from the current widths (removing two coupled
        channels saves less than the sum of their costs, so a round may fall short) and measures again.
        Returns the channels removed; stops early when the floors allow no more."""
        removed = 0
        for _ in range(rounds):
            excess = self.measure(quantity, example_inputs) - target
            if excess <= 0:
                break
            costs = self.channel_costs(quantity, example_inputs)
            step = self.remove(
                0,
                params,
                masks,
                score=score,
                optimizer=optimizer,
                agree=agree,
                costs=costs,
                quota=excess,
                at_least=True,
            )
            if step == 0:
                unit = {"macs": "MACs", "params": "parameters", "latency": "ns predicted"}[quantity]
                warnings.warn(
                    f"{quantity} budget not reached: {self.measure(quantity, example_inputs):,} {unit} left "
                    f"for {target:,} allowed, and every prunable group is at its floor (lower "
                    "min_channel_ratio or raise the budget)",
                    stacklevel=3,
                )
                break
            removed += step
        return removed

    # ------------------------------------------------------------------ removal
    def scores(
        self, params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], score: str = "umm"
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Scores of every alive channel of every group, their group ids, and per group the original ids of
        its alive channels (in score order). ``masks`` may miss a parameter: it is then dense."""
        scores, gids, ids = [], [], []
        for i, g in enumerate(self.groups):
            alive = self.surgery.alive_channels(g.name)
            per_producer = []
            for s in g.producers:
                if s.tensor not in params:
                    continue  # a producer kept dense by dense_layers still scores through its siblings
                w = params[s.tensor]
                m = masks.get(s.tensor)
                if m is None:
                    m = torch.ones_like(w, dtype=torch.bool)
                else:  # masked weights do not count, also when they are not zeroed in the weight
                    w = w * m
                sc = channel_score(w, m, self.row_numel[s.tensor], score)
                # This group's rows only: a producer may also carry other groups' channels (its output is
                # concatenated, or added to a concatenation), and in mask mode removed rows remain.
                # A grouped-conv unit owns several rows: its score is their mean (UMM stays a mean).
                rows = self.surgery.slot_positions(g.name, s.tensor, sliced=self.removal == "physical")
                per_producer.append(sc[rows.to(sc.device)].mean(1))
            score_g = torch.stack(per_producer).mean(0)
            scores.append(score_g)
            gids.append(torch.full_like(score_g, i, dtype=torch.long))
            ids.append(alive.nonzero().squeeze(1))
        return torch.cat(scores), torch.cat(gids), ids

    @torch.no_grad()
    def remove(
        self,
        keep: int,
        params: Mapping[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
        *,
        score: str = "umm",
        optimizer: Optional[torch.optim.Optimizer] = None,
        agree: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        costs: Optional[Sequence[int]] = None,
        quota: Optional[int] = None,
        at_least: bool = False,
    ) -> int:
        """Remove the lowest-score channels until ``keep`` prunable channels are left (water-filling under
        the floors). With ``costs`` (what one channel, or unit, of each group is worth, e.g. the MACs it
        saves) and ``quota`` in that unit instead, remove until their sum is nearest the quota. The order
        follows ``channel_rank``: score; score over cost (``"score_per_cost"``); score over the group's
        mean score (``"normalized"``); the share of its group gone once the channel goes (``"uniform"``),
        over the group's :attr:`latency_weights` to the power ``LATENCY_WEIGHT_EXPONENT``
        (``"latency_weighted"``).
        ``masks`` is updated in place (sliced, or removed rows zeroed); ``agree`` makes every distributed
        rank take the same choice. Returns the number of channels removed."""
        alive = [self.surgery.current_width(g.name) for g in self.groups]
        if costs is None:
            costs, quota = self.units, self.alive_total() - keep  # in channels; a unit costs its channels
        assert quota is not None
        if quota <= 0:
            return 0
        scores, gids, ids = self.scores(params, masks, score)
        scores, gids = scores.float().cpu(), gids.cpu()
        if self.channel_rank == "score_per_cost":
            # Lowest score per unit saved first: a cheap channel must score much lower to go before an
            # expensive one. Only the order matters to the water-filling, so no normalisation.
            scores = scores / torch.as_tensor(costs, dtype=torch.float)[gids]
        elif self.channel_rank == "normalized":
            # Over the mean score of the group's alive channels: a layer whose weights are small across the
            # board (sparser under ERK, usually deeper) is not emptied before the others are touched.
            n = len(self.groups)
            sums = torch.zeros(n).index_add_(0, gids, scores)
            means = sums / torch.bincount(gids, minlength=n).clamp(min=1)
            scores = scores / means.clamp(min=torch.finfo(torch.float).tiny)[gids]
        elif self.channel_rank in ("uniform", "latency_weighted"):
            scores = _uniform_order(scores, gids, alive, [g.width for g in self.groups])
            if self.channel_rank == "latency_weighted":
                # A group reaches a given key at a share that grows with its time per unit of the budget:
                # where the device spends more time per MAC (per channel, per parameter), more goes.
                if self.latency_weights is None:
                    raise RuntimeError("channel_rank='latency_weighted' needs use_latency_table() first")
                weights = torch.as_tensor(self.latency_weights, dtype=torch.float)
                scores = scores / weights.pow(LATENCY_WEIGHT_EXPONENT)[gids]
        if self.channel_multiple > 1:
            chosen = self._aligned_choice(scores, gids, alive, quota, costs, at_least)
        else:
            caps = [max(0, a - f) for a, f in zip(alive, self.floors)]
            chosen = water_fill(scores, gids, caps, quota, costs=costs, at_least=at_least)
        if agree is not None:  # every rank removes rank 0's choice (same shape on all ranks)
            picked = torch.zeros(scores.numel(), dtype=torch.bool)
            picked[chosen] = True
            chosen = agree(picked).nonzero().squeeze(1)
        chosen_gids = gids[chosen]
        # Position of each chosen channel inside its group's alive list -> its original channel id.
        starts = torch.tensor([0, *alive]).cumsum(0)[:-1]
        local = chosen - starts[chosen_gids]
        removals = {}
        for i, g in enumerate(self.groups):
            sel = local[chosen_gids == i]
            if sel.numel():
                removals[g.name] = ids[i][sel]
        if self.removal == "physical":
            remove_channels(self.module, self.surgery, removals, optimizer=optimizer, masks=masks)
        else:
            self.surgery.mark_removed(removals)
            zero_removed(self.module, self.surgery, optimizer=optimizer, masks=masks)
        units = torch.as_tensor(self.units)[chosen_gids] if chosen.numel() else torch.zeros(0)
        return int(units.sum())

    def _aligned_choice(
        self,
        scores: torch.Tensor,
        gids: torch.Tensor,
        alive: list[int],
        quota: int,
        costs: Sequence[int],
        at_least: bool = False,
    ) -> torch.Tensor:
        """Water-filling over blocks that keep every group a multiple of ``channel_multiple`` channels:
        each group's alignment remainder first (lowest scores), then whole blocks, lowest block score
        first, until the quota is met as nearly as the block sizes allow."""
        members, bgids, _, bscores, forced = aligned_blocks(
            scores, gids, alive, self.floors, self.units, self.channel_multiple
        )
        block_costs = [int(m.numel()) * costs[g] for m, g in zip(members, bgids)]
        picked = [i for i, f in enumerate(forced) if f]
        left = quota - sum(block_costs[i] for i in picked)
        rest = [i for i, f in enumerate(forced) if not f]
        if left > 0 and rest:
            n_groups = len(self.groups)
            cost_of = [0] * n_groups
            caps = [0] * n_groups
            for i in rest:
                cost_of[bgids[i]], caps[bgids[i]] = block_costs[i], caps[bgids[i]] + 1
            sel = water_fill(
                torch.tensor([bscores[i] for i in rest]),
                torch.tensor([bgids[i] for i in rest], dtype=torch.long),
                caps,
                left,
                costs=[c or 1 for c in cost_of],
                at_least=at_least,
            )
            picked += [rest[int(j)] for j in sel]
        if not picked:
            return torch.empty(0, dtype=torch.long)
        return torch.cat([members[i] for i in picked])


@dataclass
class PrunedChannels:
    """What :func:`prune_channels` did.

    Attributes:
        history: the channel-removal record (``chase.slim`` ``history``): :func:`chase.load_slim` replays
            it on a fresh model.
        masks: the given masks, sliced to the new shapes (None when none were given).
        removed: channels removed per group.
        total_channels: prunable channels before pruning.
        refused_groups: groups kept whole, and why.
    """

    history: dict[str, Any]
    masks: Optional[dict[str, torch.Tensor]]
    removed: dict[str, int] = field(default_factory=dict)
    total_channels: int = 0
    refused_groups: dict[str, str] = field(default_factory=dict)

    @property
    def channel_sparsity(self) -> float:
        """Fraction of the prunable channels removed."""
        return sum(self.removed.values()) / self.total_channels if self.total_channels else 0.0


@torch.no_grad()
def prune_channels(
    model: nn.Module,
    example_inputs: Any,
    *,
    channel_sparsity: float,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    min_channel_ratio: float = 0.2,
    prune_skip: bool = False,
    prune_heads: bool = False,
    keep_channels: Sequence[str] = (),
    channel_score: str = "umm",
    dense_layers: Sequence[str] = (),
    channel_multiple: int = 1,
    target: str = "channels",
    macs_ratio: Optional[float] = None,
    params_ratio: Optional[float] = None,
    latency_ratio: Optional[float] = None,
    latency_table: Any = None,
    channel_rank: str = "score",
) -> PrunedChannels:
    """One-shot global channel pruning, in place: by the same groups, scores, floors and surgery as a
    Chase channel event, remove ``channel_sparsity`` of the prunable channels of ``model``.

    Channels are scored on the weights of the sparse layers (Conv/Linear minus ``dense_layers``) times
    ``masks`` (parameter name -> bool tensor; missing names are dense, as is everything when ``masks`` is
    None). The model is narrowed physically; build its optimizer afterwards. Save the result with
    ``chase.slim.make_slim(model, history=result.history)``. With ``channel_multiple=m`` every group
    keeps a multiple of ``m`` channels (a group narrower than ``m`` keeps its width). With
    ``target="macs"`` (``"params"``) channels go, lowest score first, until the model's MACs per example
    (parameters) are at most ``macs_ratio`` (``params_ratio``) of what they were, or with
    ``target="latency"`` until the time ``latency_table`` predicts is ``latency_ratio`` of the dense
    model's; ``channel_sparsity`` then only sets the floors. ``channel_rank="normalized"`` ranks channels
    by score over their group's mean score, ``"uniform"`` takes the same share of every group (its
    lowest-scored channels), ``"latency_weighted"`` a share that grows with the group's time per unit of
    the budget by ``latency_table``, and with a budget target ``"score_per_cost"`` ranks them by score
    per unit of the budget they save.
    ``prune_heads`` also removes whole attention heads (see :class:`~chase.Chase`).
    """
    check_channel_options(
        channel_sparsity=channel_sparsity,
        min_channel_ratio=min_channel_ratio,
        channel_score=channel_score,
        channel_multiple=channel_multiple,
        target=target,
        macs_ratio=macs_ratio,
        params_ratio=params_ratio,
        latency_ratio=latency_ratio,
        latency_table=latency_table,
        channel_rank=channel_rank,
    )
    module = unwrap_model(model)
    params = find_sparse_params(module, dense_layers=dense_layers)
    work = {n: m.to(params[n].device, torch.bool).clone() for n, m in (masks or {}).items() if n in params}
    unknown = sorted(set(masks or {}) - set(params))
    if unknown:
        raise ValueError(f"masks name parameters that are not sparse layers of the model: {unknown[:5]}")
    wrong = [
        f"{n}: {tuple(m.shape)} vs {tuple(params[n].shape)}"
        for n, m in work.items()
        if m.shape != params[n].shape
    ]
    if wrong:
        raise ValueError(f"masks must have their weight's shape: {wrong[:3]}")
    example = _like(example_inputs, next(iter(params.values())))
    pruner = ChannelPruner(
        module,
        example,
        params,
        channel_sparsity=channel_sparsity,
        min_channel_ratio=min_channel_ratio,
        prune_skip=prune_skip,
        prune_heads=prune_heads,
        keep_channels=keep_channels,
        channel_multiple=channel_multiple,
        channel_rank=channel_rank,
    )
    before = pruner.alive_channels()
    ratio = {"macs": macs_ratio, "params": params_ratio, "latency": latency_ratio}.get(target)
    if latency_table is not None:  # the check above allows it only where it is used
        pruner.use_latency_table(latency_table, target, example)
    if ratio is not None:
        budget = round(pruner.measure(target, example) * ratio)
        pruner.remove_to_budget(target, budget, example, params, work, score=channel_score)
    else:
        keep = round(pruner.total_channels * (1.0 - channel_sparsity))
        pruner.remove(keep, params, work, score=channel_score)
    after = pruner.alive_channels()
    units = dict(zip(before, pruner.units))
    log.info("prune_channels: %.1f%% of prunable channels removed", 100 * pruner.channel_sparsity_now())
    return PrunedChannels(
        history=pruner.surgery.state_dict(),
        masks=work if masks is not None else None,
        removed={g: (before[g] - after[g]) * units[g] for g in before if before[g] != after[g]},
        total_channels=pruner.total_channels,
        refused_groups=dict(pruner.refused_groups),
    )


def untrained_slim(
    model: nn.Module,
    example_inputs: Any,
    channel_sparsity: float,
    prune_skip: bool = False,
    density: float = INIT_DENSITY,
    channel_multiple: int = 1,
    **options: Any,
) -> nn.Module:
    """A copy of ``model`` narrowed at once to Chase's final width for ``channel_sparsity``. The channels are
    chosen as Chase chooses at its first event: by UMM of the current (e.g. random) weights masked at
    ``density`` (ERK masks, drawn as a Chase with seed 0 draws them), not of the dense weights; the copy
    keeps those masked weights. ``options`` go to :func:`prune_channels` (e.g. ``target="macs",
    macs_ratio=0.6``). For timing and FLOPs only: it is not a trained model."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    work = copy.deepcopy(unwrap_model(model))
    params = find_sparse_params(work)
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    masks = random_masks(shapes, layer_counts(shapes, density, "erk"), torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m.to(params[n].device))
    prune_channels(
        work,
        example_inputs,
        channel_sparsity=channel_sparsity,
        masks=masks,
        prune_skip=prune_skip,
        channel_multiple=channel_multiple,
        **options,
    )
    return work.eval()


def untrained_label(
    channel_sparsity: float, prune_skip: bool, density: float = INIT_DENSITY, channel_multiple: int = 1
) -> str:
    """What an :func:`untrained_slim` model is, for every table that reports one."""
    multiple = f" channel_multiple={channel_multiple}" if channel_multiple > 1 else ""
    return (
        f"UNTRAINED width: Chase channel_sparsity={channel_sparsity} prune_skip={prune_skip}{multiple}, all "
        f"removed at once, channels ranked by UMM of the initial weights masked at density {density} (ERK)"
    )


def _uniform_order(
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


def _without_kept(groups: list[ChannelGroup], patterns: Sequence[str]) -> list[ChannelGroup]:
    """``groups`` minus those with a producer matched by a ``keep_channels`` pattern (each must match one)."""
    if not patterns:
        return groups
    used: set[str] = set()
    out = []
    for g in groups:
        names = [n for s in g.producers for n in (s.tensor, s.tensor.rpartition(".")[0])]
        hits = {p for n in names for p in matches(n, patterns)}
        used |= hits
        if not hits:
            out.append(g)
    unused = [p for p in patterns if p not in used]
    if unused:
        layers = sorted({s.tensor.rpartition(".")[0] for g in groups for s in g.producers})
        raise ValueError(
            f"keep_channels pattern(s) {unused} match no prunable channel group; patterns are fnmatch globs "
            f"over producing layers' module names, here: {', '.join(layers[:8])}"
            + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")
        )
    return out


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` (a tensor, or lists, tuples and dicts of them) with ``fn`` applied to every tensor."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _like(obj: Any, ref: torch.Tensor) -> Any:
    """``obj`` with its tensors on ``ref``'s device, floating ones in ``ref``'s dtype (so an example input
    made on the CPU in fp32 works for a model on CUDA or in fp64)."""
    return _map_tensors(obj, lambda t: t.to(ref.device, ref.dtype if t.is_floating_point() else t.dtype))


def _zeros_like(obj: Any) -> Any:
    """``obj`` with every tensor replaced by zeros of batch size 1 (same dtype, device, other dims)."""
    return _map_tensors(
        obj, lambda t: torch.zeros((1, *t.shape[1:]) if t.ndim else (), dtype=t.dtype, device=t.device)
    )
