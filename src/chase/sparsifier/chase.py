"""Chase: dynamic sparse training that removes whole channels while it trains (Yin et al., NeurIPS 2023)."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from chase.graph import ChannelGraph
from chase.graph.types import ChannelGroup
from chase.nested import like, zeros_like
from chase.sparse import schedules
from chase.sparsifier.base import Sparsifier, StepInfo
from chase.sparsifier.costs import cost_from_state, cost_state, describe_cost
from chase.sparsifier.latency import LatencyTable
from chase.sparsifier.pruner import ChannelPruner
from chase.sparsifier.schedule import ChannelSchedule, Schedule, channel_schedule
from chase.sparsifier.specs import FLAT_NAMES, Budget, ChannelSpec, resolve_specs
from chase.surgery import SurgeryState, alive_mask, replay, zero_removed

log = logging.getLogger(__name__)

__all__ = ["Chase"]


class Chase(Sparsifier):
    """Channel-aware dynamic sparse training.

    Global MEST soft-bound exploration (prune by |w|, grow by |gradient|, ``d + delta(t)`` held between
    updates) plus gradual global channel pruning: every ``channel_every`` steps, offset by half an
    exploration interval, the channels ranked lowest (by UMM, the paper's score, by default) among all
    prunable channel groups are removed until ``channel_sparsity * (1 - (1 - t/channel_end)^3)`` of the
    prunable channels are gone, or with a budget until the model's MACs, parameters or predicted time meet
    the same cubic ramp towards their final ratio; no layer goes below
    ``int(C * (1 - channel_sparsity) * min_channel_ratio)`` channels. The weight budget is counted against
    the ORIGINAL dense size, so weights freed by removed channels are regrown inside the surviving ones at
    the next update.

    With ``removal="physical"`` (default) the channels are sliced out of the model, its masks and the
    optimizer state at each event (same parameter and optimizer objects; :class:`StepInfo` reports
    ``shapes_changed`` so a loop can re-wrap DDP or re-compile). ``removal="mask"`` keeps shapes and
    zeroes removed channels, as the reference code does; :meth:`export` slices them out at the end.

    Args:
        model, optimizer, density, total_steps: as for :class:`Sparsifier`.
        example_inputs: an input batch (tensor, tuple or dict) used once to discover channel groups.
        channels: what may be removed, how much, when and how (:class:`~chase.ChannelSpec`: S_c, beta,
            prune_skip, prune_heads, keep_channels, score, ranking, channel_multiple, channel_every,
            channel_end, removal); default ``ChannelSpec()``.
        budget: what the schedule counts (:class:`~chase.Budget`): the prunable channels (default), or
            ``Budget.macs(r)`` / ``.params(r)`` / ``.latency(r, cost)``: the model's MACs, parameters or
            predicted time reach ``r`` of the dense model's, the last event within about one channel's
            cost (floors permitting). Budgets need ``removal="physical"``.
        update_every: exploration interval (the paper's Delta T_p, 1000).
        soft_bound: MEST's delta0 (0.05); soft_bound_end: step (or fraction of the run) where delta reaches
            0 (default 0.8 of the run, or the last update step if that comes earlier).
        swap_fraction, swap_floor: after the soft bound, RigL swaps
            ``swap_floor + (swap_fraction - swap_floor)(1 + cos(pi t / total_steps))/2`` of the budget.
        **kwargs: any other :class:`Sparsifier` option (distribution, dense_layers, seed, ...), and, for one
            more release, the flat channel options of earlier releases (``channel_sparsity=0.5,
            target="macs", macs_ratio=0.5``; a ``FutureWarning`` says so once).
    """

    soft_bound_end_fraction = 0.8  # the paper's T_chan: soft bound and channel pruning end together
    removes_channels = True
    #: Chase explores globally with MEST's gradient growth (the engine's defaults are RigL's).
    defaults: ClassVar[dict[str, Any]] = {"scope": "global", "growth": "gradient"}
    #: the typed option families Chase takes, by keyword (the registry and the trainer build them).
    option_specs: ClassVar[dict[str, type]] = {"channels": ChannelSpec, "budget": Budget}

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        density: float,
        total_steps: int,
        example_inputs: Any,
        channels: ChannelSpec | None = None,
        budget: Budget | None = None,
        update_every: int = 1000,
        soft_bound: float = 0.05,
        soft_bound_end: int | float | None = None,
        swap_fraction: float = 0.5,
        swap_floor: float = 0.005,
        **kwargs: Any,
    ) -> None:
        flat = {k: kwargs.pop(k) for k in list(kwargs) if k in FLAT_NAMES}
        #: the channel-pruning options and what the schedule counts (typed, validated); ``budget`` is the
        #: engine's weight count.
        self.channels, self.channel_budget = resolve_specs(channels, budget, flat, caller="Chase")
        kwargs = {**self.defaults, **kwargs}
        kwargs.setdefault("swap_horizon", total_steps)
        self.removal = self.channels.removal
        #: whether channels are to be removed at all (S_c > 0, or a budget).
        self.prunes = _prunes(self.channels, self.channel_budget)
        self._example_inputs = example_inputs
        super().__init__(
            model,
            optimizer,
            density=density,
            total_steps=total_steps,
            update_every=update_every,
            soft_bound=soft_bound,
            soft_bound_end=soft_bound_end,
            swap_fraction=swap_fraction,
            swap_floor=swap_floor,
            **kwargs,
        )

    @classmethod
    def check_schedule(cls, total_steps: int, options: Mapping[str, Any]) -> Schedule:
        """The exploration schedule's checks and the channel events': at least one must fit, with an
        exploration update after the last (``options`` hold the ``channels`` and ``budget`` specs)."""
        schedule = super().check_schedule(total_steps, options)
        channels, budget = options["channels"], options["budget"]
        channel_schedule(
            schedule, every=channels.channel_every, end=channels.channel_end, prunes=_prunes(channels, budget)
        )
        return schedule

    def _prepare(self) -> None:
        """Channel groups, floors and the event schedule; refuses bad options before anything is changed."""
        #: the channel events (:mod:`chase.sparsifier.schedule`).
        self.channel_plan: ChannelSchedule = channel_schedule(
            self.schedule,
            every=self.channels.channel_every,
            end=self.channels.channel_end,
            prunes=self.prunes,
        )
        like_param = next(iter(self._masks.params.values()))
        example_inputs = like(self._example_inputs, like_param)
        del self._example_inputs  # only its shapes mattered: do not hold the user's batch
        # A one-example batch of zeros with the input's shapes: budget targets count MACs per example.
        self._probe = zeros_like(example_inputs)
        self.pruner = ChannelPruner(self.module, example_inputs, self._masks.params, self.channels)
        if self.channel_budget.cost is not None:  # the specs' check allows a cost model only where it is used
            self.pruner.use_cost(self.channel_budget.cost, self.channel_budget.kind, self._probe)
        #: the dense model's measure (MACs per example, parameters, ns), which a budget is a ratio of.
        self.dense_target_value = (
            self.pruner.measure(self.channel_budget.kind, self._probe)
            if self.channel_budget.ratio is not None
            else None
        )
        self._region: torch.Tensor | None = None
        why = self.graph.why_kept()
        if self.prunes and not self.groups:
            warnings.warn(
                f"Chase found no prunable channel group: only unstructured sparsity ({why or 'no groups'}; "
                "chase check --explain names the layers)",
                stacklevel=2,
            )
        log.info("Chase: %d prunable channel groups, %d channels", len(self.groups), self.total_channels)
        if why and self.groups:
            log.info("Chase: %s", why)

    @property
    def channel_every(self) -> int:
        """Optimizer steps between channel events."""
        return self.channel_plan.every

    @property
    def channel_offset(self) -> int:
        """The first event comes at ``channel_offset + channel_every``: half an exploration interval."""
        return self.channel_plan.offset

    @property
    def channel_end(self) -> int:
        """The last step a channel event may fall on (T_chan)."""
        return self.channel_plan.end

    @property
    def last_event(self) -> int:
        """The last channel event (0: none), where the schedule reaches its final sparsity or budget."""
        return self.channel_plan.last_event

    # ------------------------------------------------------------------ schedule
    def is_channel_step(self, t: int) -> bool:
        """Whether a channel event is due after optimizer step ``t``: at ``offset + k * channel_every``
        (k >= 1, offset = half an exploration interval) up to ``channel_end``."""
        return self.prunes and self.channel_plan.is_event(t)

    def target_channel_sparsity(self, t: int) -> float:
        """Fraction of prunable channels removed after the event at step ``t``: the cubic ramp
        ``S_c (1 - (1 - t/T)^3)`` with ``T`` the last event step, so the last event reaches ``S_c``."""
        return schedules.cubic_channel_sparsity(t, final=self.channels.channel_sparsity, end=self.last_event)

    # ------------------------------------------------------------------ read-outs
    def describe(self) -> str:
        """``channel_sparsity=S`` and every other channel option or budget that differs from the
        defaults."""
        rest = [self.channels.replace(channel_sparsity=ChannelSpec().channel_sparsity).describe()]
        rest.append(self.channel_budget.describe())
        return ", ".join([f"channel_sparsity={self.channels.channel_sparsity:g}", *filter(None, rest)])

    def predicted_ms(self) -> float | None:
        """The forward time the budget's cost model predicts for the current widths (None without one)."""
        cost = self.pruner.cost
        return None if cost is None else cost.model_ms(self.pruner, self._probe)

    @property
    def graph(self) -> ChannelGraph:
        """The model's channel graph (traced once, at construction)."""
        return self.pruner.graph

    @property
    def groups(self) -> list[ChannelGroup]:
        """The prunable channel groups (after ``keep_channels`` and refusals)."""
        return self.pruner.groups

    @property
    def refused_groups(self) -> dict[str, str]:
        """Groups kept whole because some layer cannot be narrowed, and why."""
        return self.pruner.refused_groups

    @property
    def total_channels(self) -> int:
        """Prunable channels at construction (units counted with their channels)."""
        return self.pruner.total_channels

    @property
    def _surgery(self) -> SurgeryState:
        return self.pruner.surgery

    def alive_channels(self) -> dict[str, int]:
        """Alive channels (units, for a group of grouped-conv units) per prunable group."""
        return self.pruner.alive_channels()

    def channel_sparsity_now(self) -> float:
        """Fraction of prunable channels removed so far."""
        return self.pruner.channel_sparsity_now()

    # ------------------------------------------------------------------ channel events
    def _after_step(self, t: int, info: StepInfo) -> None:
        if self.is_channel_step(t):
            info.channels_removed = self.remove_channels_now(t)
            info.shapes_changed = self.removal == "physical" and info.channels_removed > 0

    @torch.no_grad()
    def target_value(self, t: int) -> int | None:
        """With a budget: the model's measure (MACs, parameters, predicted ns) allowed after the event at
        step ``t``, ``dense x (1 - (1 - ratio) (1 - (1 - t/T)^3))``; None when the schedule counts
        channels."""
        ratio = self.channel_budget.ratio
        if ratio is None:
            return None
        ramp = schedules.cubic_channel_sparsity(t, final=1.0, end=self.last_event)
        return round(self.dense_target_value * (1.0 - (1.0 - ratio) * ramp))

    def remove_channels_now(self, t: int) -> int:
        """Run the channel event of step ``t``: remove the quota of lowest-ranked channels (water-filling).
        Weights that are not finite (a diverged step) score nothing: the event is skipped, and said so; the
        next event catches up (the schedule counts from the start)."""
        params = self._masks.params
        # One sync for all layers: the sum of the weights' norms is finite iff every weight is.
        if not bool(torch.isfinite(torch.stack([p.detach().float().norm() for p in params.values()]).sum())):
            warnings.warn(
                f"step {t}: weights are not finite (NaN/Inf): channel event skipped, no channel removed",
                RuntimeWarning,
                stacklevel=3,
            )
            return 0
        masks = {n: m.clone() for n, m in self._masks.masks.items()}
        agree = self._share if self._distributed() else None
        target = self.target_value(t)
        if target is not None:
            removed = self.pruner.remove_to_budget(
                self.channel_budget.kind,
                target,
                self._probe,
                params,
                masks,
                optimizer=self.optimizer,
                agree=agree,
            )
        else:
            keep = round(self.total_channels * (1.0 - self.target_channel_sparsity(t)))
            removed = self.pruner.remove(keep, params, masks, optimizer=self.optimizer, agree=agree)
        if not removed:
            return 0
        self._masks.rebuild(masks)
        self._region = None
        self._broadcast_masks()
        self._masks.apply(self.optimizer)
        log.info(
            "step %d: removed %d channels (%.1f%% of prunable channels gone)",
            t,
            removed,
            100 * self.channel_sparsity_now(),
        )
        return removed

    def growth_region(self) -> torch.Tensor | None:
        """In mask mode, growth never lands in removed channels (physically removed ones do not exist)."""
        if self.removal == "physical":
            return None
        if self._region is None:
            parts = []
            for n in self._masks.names:
                p = self._masks.params[n]
                m = alive_mask(self._surgery, n, p.shape, device=p.device)
                parts.append(
                    torch.ones(p.numel(), dtype=torch.bool, device=p.device) if m is None else m.reshape(-1)
                )
            self._region = torch.cat(parts)
        return self._region

    # ------------------------------------------------------------------ state and export
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["surgery"] = self._surgery.state_dict()
        state["removal"] = self.removal
        if self.pruner.cost is not None:  # a resume prunes by the cost model the run started with
            state["cost"] = cost_state(self.pruner.cost)
        if self.pruner.rank_weights is not None:  # weighed on the dense model: a resume keeps them
            state["rank_weights"] = list(self.pruner.rank_weights)
        return state

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("removal") != self.removal:
            raise ValueError(
                f"state_dict was saved with removal={state.get('removal')!r}, not {self.removal!r}"
            )
        self._surgery.load_state_dict(state["surgery"])
        saved = _saved_cost(state)
        if saved is not None:
            mine = self.pruner.cost
            if mine is not None and cost_state(saved) != cost_state(mine):
                warnings.warn(
                    f"the {describe_cost(saved)} changed since the run started: the run goes on with the "
                    "saved one",
                    stacklevel=3,
                )
            self.pruner.cost = saved
        weights = state.get("rank_weights", state.get("latency_weights"))  # the key before 0.3
        if weights is not None:
            self.pruner.rank_weights = [float(w) for w in weights]
        if self.removal == "physical":
            replay(self.module, state["surgery"])
        else:
            zero_removed(self.module, self._surgery)
        self._region = None

    def export(self) -> nn.Module:
        """A copy of the model with removed channels sliced out and masked weights set to 0.

        Same outputs as the trained model (in eval mode). Put it in ``eval()`` for inference.
        """
        slim = copy.deepcopy(self.module)
        with torch.no_grad():
            for name, mask in self._masks.masks.items():
                slim.get_parameter(name).mul_(mask)
        if self.removal == "mask":
            replay(slim, self._surgery.state_dict())
        return slim

    def export_history(self) -> dict[str, Any]:
        """The channel-removal record that reshapes a fresh model to :meth:`export`'s shapes."""
        return self._surgery.state_dict()

    def _export_masks(self) -> dict[str, torch.Tensor] | None:
        # In mask mode the masks keep the full shapes while the export is sliced.
        return super()._export_masks() if self.removal == "physical" else None


def _saved_cost(state: Mapping[str, Any]) -> Any:
    """The cost model a state holds: ``cost`` (from 0.3), or the latency table of earlier states."""
    if "cost" in state:
        return cost_from_state(state["cost"])
    if "latency_table" in state:
        return LatencyTable.from_dict(state["latency_table"])
    return None


def _prunes(channels: ChannelSpec, budget: Budget) -> bool:
    """Whether channels are to be removed at all: S_c > 0, or a budget."""
    return channels.channel_sparsity > 0 or budget.ratio is not None
