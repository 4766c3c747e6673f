"""Global channel pruning on one model: its prunable channel groups, their floors and scores, and the
removal of the lowest-ranked channels. Chase runs it at every channel event; :func:`chase.prune_channels`
once."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

from chase.graph import ChannelGraph, channel_groups
from chase.graph.types import ChannelGroup
from chase.sparse.channels import aligned_blocks, channel_score, water_fill
from chase.sparse.targets import matches
from chase.sparsifier.budgets import BUDGET_KINDS, BudgetKind
from chase.sparsifier.costs import CostModel
from chase.sparsifier.dry_run import breaking_groups
from chase.sparsifier.rankings import RankContext
from chase.sparsifier.specs import ChannelSpec
from chase.surgery import SurgeryState, removal_problem, remove_channels, zero_removed
from chase.surgery.state import _lookup_tensor

log = logging.getLogger(__name__)

__all__ = ["ChannelPruner"]


class ChannelPruner:
    """The channel side of Chase on one model.

    Finds the prunable channel groups whose producers are among ``params`` (minus ``keep_channels``,
    minus groups some module cannot follow or whose removal breaks the forward pass: those are refused
    with a warning), and removes channels in the order of ``spec``'s ranking with per-group floors
    ``int(C (1 - channel_sparsity) min_channel_ratio)`` (at least 1).

    Args:
        module: the (unwrapped) model.
        example_inputs: an input batch on the model's device and dtype, used to trace the groups.
        params: the weights that are scored (name -> parameter), usually the sparse layers.
        spec: what may be removed, how much and how (:class:`~chase.ChannelSpec`; its schedule fields are
            Chase's, not the pruner's).
    """

    def __init__(
        self,
        module: nn.Module,
        example_inputs: Any,
        params: Mapping[str, torch.Tensor],
        spec: ChannelSpec,
    ) -> None:
        self.module = module
        self.spec = spec
        self.ranking = spec.ranking
        self.removal = spec.removal
        self.channel_multiple = int(spec.channel_multiple or 1)
        #: the cost model of a latency budget or of a ranking weighed by time (set by :meth:`use_cost`).
        self.cost: Optional[CostModel] = None
        #: the ranking's per-group weights, fixed at the start of a run (:meth:`use_cost`).
        self.rank_weights: Optional[list[float]] = None
        self.graph: ChannelGraph = channel_groups(
            module, example_inputs, prune_skip=spec.prune_skip, prune_heads=spec.prune_heads
        )
        if spec.prune_heads and not any(g.kind == "heads" for g in self.graph):
            warnings.warn(
                "prune_heads=True, but the model has no attention whose heads can be removed "
                "(nn.MultiheadAttention, fused qkv or q/k/v/o projections): only channels are pruned",
                stacklevel=4,
            )
        groups = [g for g in self.graph.prunable() if any(s.tensor in params for s in g.producers)]
        self.groups = _without_kept(groups, spec.keep_channels)
        inexact = [g.name for g in self.groups if not g.exact]
        if spec.removal == "mask" and inexact:
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
        keep = (1 - spec.channel_sparsity) * spec.min_channel_ratio
        self.floors = [max(1, int(g.width * keep)) for g in self.groups]
        # Filter size of each producer before any input channel was removed: UMM divides by it.
        self.row_numel = {s.tensor: params[s.tensor][0].numel() for g in self.groups for s in g.producers}
        if self.channel_multiple > 1 and self.groups:
            self._check_alignment(spec.channel_sparsity)

    def _check_alignment(self, sparsity: float) -> None:
        """Warn when ``channel_multiple`` leaves fewer channels removable than S_c asks (groups narrower
        than it keep their width; the others go in whole blocks above their floors)."""
        m, removable = self.channel_multiple, 0
        for g, u, floor in zip(self.groups, self.units, self.floors):
            step = m // math.gcd(m, u)
            if g.width * u >= m:
                low = max(-(-floor // step) * step, step)
                removable += max(0, (g.width - g.width % step) - low + g.width % step) * u
        wanted = round(self.total_channels * sparsity)
        if removable < wanted:
            narrow = sum(g.width * u < m for g, u in zip(self.groups, self.units))
            warnings.warn(
                f"channel_multiple={m}: at most {removable} of the {wanted} channels channel_sparsity="
                f"{sparsity:g} asks can be removed ({narrow} of {len(self.groups)} prunable groups are "
                f"narrower than {m} and keep their width; the others go in blocks of {m} above their floors)",
                stacklevel=4,
            )

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
    def measure(self, kind: str | BudgetKind, example_inputs: Any) -> int:
        """The model's measure of budget kind ``kind`` now (``"macs"`` per example as
        :func:`chase.count_flops` counts them, ``"params"``, ``"latency"`` in predicted ns, ...)."""
        return _kind(kind).measure(self, example_inputs)

    def use_cost(self, cost: CostModel, kind: str | BudgetKind, example_inputs: Any) -> None:
        """Predict time with ``cost`` (it must fit this model: ``cost.check``) and fix the ranking's
        per-group weights for budget kind ``kind``, on the model as it is now: dense, at the start of a
        run. A cost model that does not fit is not kept."""
        cost.check(self, example_inputs)
        self.cost = cost
        self.rank_weights = self.ranking.weights(self, _kind(kind), example_inputs)

    def slice_costs(self, weigh: Callable[[str, torch.Tensor, float], float]) -> list[int]:
        """Per group, what removing one channel (one unit of a grouped conv) saves: the sum over every
        tensor slice the channel owns (its producer's filter, its consumers' input columns, norm entries)
        of ``weigh(tensor name, tensor, numel of the slice)``; at least 1."""
        costs = []
        for g in self.groups:
            total = 0.0
            for slot in g.slots:
                tensor = _lookup_tensor(self.module, slot.tensor)
                numel = tensor.numel() / max(1, tensor.shape[slot.dim]) * slot.index.shape[1]
                total += weigh(slot.tensor, tensor, numel)
            costs.append(max(1, round(total)))
        return costs

    def channel_costs(self, kind: str | BudgetKind, example_inputs: Any) -> list[int]:
        """What removing one channel (unit) of each group saves now, in budget kind ``kind``'s unit."""
        return _kind(kind).channel_costs(self, example_inputs)

    @torch.no_grad()
    def remove_to_budget(
        self,
        kind: str | BudgetKind,
        target: int,
        example_inputs: Any,
        params: Mapping[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
        *,
        optimizer: Optional[torch.optim.Optimizer] = None,
        agree: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        rounds: int = 8,
    ) -> int:
        """Remove channels until the model's measure of ``kind`` is at most ``target``: each round
        predicts the savings from the current widths (removing two coupled channels saves less than the
        sum of their costs, so a round may fall short) and measures again. Returns the channels removed;
        stops early when the floors allow no more."""
        kind = _kind(kind)
        removed = 0
        for _ in range(rounds):
            excess = kind.measure(self, example_inputs) - target
            if excess <= 0:
                break
            costs = kind.channel_costs(self, example_inputs)
            step = self.remove(
                0, params, masks, optimizer=optimizer, agree=agree, costs=costs, quota=excess, at_least=True
            )
            if step == 0:
                left = kind.measure(self, example_inputs)
                floors = f"min_channel_ratio {self.spec.min_channel_ratio}"
                multiple = self.spec.channel_multiple or 1
                if multiple > 1:
                    floors += (
                        f" and one multiple of channel_multiple {multiple} (a roofline's default: its tile)"
                    )
                warnings.warn(
                    f"{kind.name} budget not reached: {left:,} {kind.unit} left for {target:,} allowed, and "
                    f"every prunable group is at its floor: {floors}; lower them, or raise the budget (what "
                    "is left is time or size no channel removal touches: launches, the input, layers kept "
                    "whole)",
                    stacklevel=3,
                )
                break
            removed += step
        return removed

    # ------------------------------------------------------------------ removal
    def scores(
        self, params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Scores (``spec.channel_score``) of every alive channel of every group, their group ids, and per
        group the original ids of its alive channels (in score order). ``masks`` may miss a parameter: it
        is then dense."""
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
                sc = channel_score(w, m, self.row_numel[s.tensor], self.spec.channel_score)
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
        optimizer: Optional[torch.optim.Optimizer] = None,
        agree: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        costs: Optional[Sequence[int]] = None,
        quota: Optional[int] = None,
        at_least: bool = False,
    ) -> int:
        """Remove the lowest-ranked channels until ``keep`` prunable channels are left (water-filling under
        the floors). With ``costs`` (what one channel, or unit, of each group is worth, e.g. the MACs it
        saves) and ``quota`` in that unit instead, remove until their sum is nearest the quota. The order
        is the spec's ranking (:mod:`chase.sparsifier.rankings`) of the channels' scores.
        ``masks`` is updated in place (sliced, or removed rows zeroed); ``agree`` makes every distributed
        rank take the same choice. Returns the number of channels removed."""
        alive = [self.surgery.current_width(g.name) for g in self.groups]
        if costs is None:
            costs, quota = self.units, self.alive_total() - keep  # in channels; a unit costs its channels
        assert quota is not None
        if quota <= 0:
            return 0
        scores, gids, ids = self.scores(params, masks)
        ctx = RankContext(
            scores.float().cpu(), gids.cpu(), alive, [g.width for g in self.groups], costs, self.rank_weights
        )
        keys = self.ranking.keys(ctx)
        gids = ctx.gids
        if self.channel_multiple > 1:
            chosen = self._aligned_choice(keys, gids, alive, quota, costs, at_least)
        else:
            caps = [max(0, a - f) for a, f in zip(alive, self.floors)]
            chosen = water_fill(keys, gids, caps, quota, costs=costs, at_least=at_least)
        if agree is not None:  # every rank removes rank 0's choice (same shape on all ranks)
            picked = torch.zeros(keys.numel(), dtype=torch.bool)
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
        each group's alignment remainder first (lowest keys), then whole blocks, lowest block key first,
        until the quota is met as nearly as the block sizes allow."""
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


def _kind(kind: str | BudgetKind) -> BudgetKind:
    return BUDGET_KINDS[kind] if isinstance(kind, str) else kind


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
