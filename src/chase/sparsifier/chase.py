"""Chase: dynamic sparse training that removes whole channels while it trains (Yin et al., NeurIPS 2023)."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from chase.graph import ChannelGraph
from chase.graph.types import ChannelGroup
from chase.sparse import schedules
from chase.sparsifier.base import Sparsifier, StepInfo
from chase.sparsifier.channel_pruning import (
    REMOVAL_MODES,
    ChannelPruner,
    _like,
    _zeros_like,
    check_channel_options,
)
from chase.sparsifier.latency import LatencyTable
from chase.surgery import SurgeryState, alive_mask, replay, zero_removed

log = logging.getLogger(__name__)

__all__ = ["REMOVAL_MODES", "Chase"]


class Chase(Sparsifier):
    """Channel-aware dynamic sparse training.

    Global MEST soft-bound exploration (prune by |w|, grow by |gradient|, ``d + delta(t)`` held between
    updates) plus gradual global channel pruning: every ``channel_every`` steps, offset by half an
    exploration interval, the channels with the lowest score (UMM by default) among all prunable channel
    groups are removed until ``channel_sparsity * (1 - (1 - t/channel_end)^3)`` of the prunable channels
    are gone; no layer goes below ``int(C * (1 - channel_sparsity) * min_channel_ratio)`` channels. The
    weight budget is counted against the ORIGINAL dense size, so weights freed by removed channels are
    regrown inside the surviving ones at the next update.

    With ``removal="physical"`` (default) the channels are sliced out of the model, its masks and the
    optimizer state at each event (same parameter and optimizer objects; :class:`StepInfo` reports
    ``shapes_changed`` so a loop can re-wrap DDP or re-compile). ``removal="mask"`` keeps shapes and
    zeroes removed channels, as the reference code does; :meth:`export` slices them out at the end.

    Args:
        model, optimizer, density, total_steps: as for :class:`Sparsifier`.
        example_inputs: an input batch (tensor, tuple or dict) used once to discover channel groups.
        channel_sparsity: final fraction of prunable channels removed (the paper's S_c: 0.3-0.5).
        channel_every: optimizer steps between channel events (the paper's Delta T).
        channel_end: step at which the cubic schedule reaches ``channel_sparsity`` (the paper's T_chan);
            default ``soft_bound_end``, but before the last exploration update (which regrows the weights
            the last event freed).
        min_channel_ratio: the paper's beta: a layer keeps at least ``int(C (1 - S_c) beta)`` channels.
        prune_skip: also prune residual-stream channels (all coupled layers together).
        prune_heads: also remove whole attention heads (query, key and value rows and the output
            projection's columns; with grouped-query attention a key/value head and its query heads), scored
            by UMM over the head's rows; a head counts as its query width in ``channel_sparsity``.
        keep_channels: fnmatch patterns of layers (module or parameter names, as ``dense_layers``) whose
            output channels are never pruned: their whole channel group leaves the prunable set, and
            ``channel_sparsity`` counts the remaining groups only. The paper keeps the stem of ResNet-50
            (``["conv1"]``) and VGG-19's last conv, which feeds the classifier. Each pattern must match
            a prunable group.
        removal: ``"physical"`` or ``"mask"``.
        channel_score: ``"umm"`` (paper), ``"kept_mean"`` or ``"density"`` (ablations).
        target: what the cubic schedule counts: ``"channels"`` (``channel_sparsity`` of the prunable
            channels), ``"macs"`` (the model's GPU-supported MACs reach ``macs_ratio`` of the dense model's)
            or ``"params"`` (``params_ratio``); the last event meets the budget within about one channel's
            cost (floors permitting). Budgets need ``removal="physical"``; floors still follow
            ``channel_sparsity`` and ``min_channel_ratio``.
            ``"latency"`` (``latency_ratio`` of the dense model's forward time, predicted by
            ``latency_table``, which ``chase profile`` measures on the target device).
        macs_ratio, params_ratio, latency_ratio: the final budget of ``target="macs"`` / ``"params"`` /
            ``"latency"``, in (0, 1).
        latency_table: a :class:`~chase.sparsifier.latency.LatencyTable`, its JSON file or dict (for
            ``target="latency"`` and ``channel_rank="latency_weighted"``).
        channel_rank: ``"score"`` (default: lowest score first, the paper's global ranking; with a budget
            target the budget decides how many), ``"score_per_cost"`` (budget targets only: lowest score per
            unit of the budget a channel saves first, so channels of expensive layers go sooner),
            ``"normalized"`` (score over the mean score of its group's alive channels: every group loses
            channels at a similar rate, the lowest-scored ones; layers that are small-scored across the
            board, as ERK's sparse deep layers are, are not emptied first) or ``"uniform"`` (every group
            loses the same share of its channels, its lowest-scored ones: layer-wise pruning with the
            paper's score inside each layer) or ``"latency_weighted"`` (as uniform, but a group's share grows
            with the square root of its time per unit of the budget, by ``latency_table``: layers that are
            slow for their MACs, such as a CNN's memory-bound early convolutions, give more; under
            ``target="latency"`` this is uniform).
        channel_multiple: after every event each prunable group keeps a multiple of this many channels
            (GPU kernels prefer multiples of 8): removals go in aligned blocks inside the same global
            ranking (a group narrower than it keeps its width; floors still hold).
        update_every: exploration interval (the paper's Delta T_p, 1000).
        soft_bound: MEST's delta0 (0.05); soft_bound_end: step where delta reaches 0 (default 0.8 x total,
            or the last update step if that comes earlier).
        swap_fraction, swap_floor: after the soft bound, RigL swaps
            ``swap_floor + (swap_fraction - swap_floor)(1 + cos(pi t / total_steps))/2`` of the budget.
        **kwargs: any other :class:`Sparsifier` option (distribution, dense_layers, seed, ...).
    """

    soft_bound_end_fraction = 0.8  # the paper's T_chan: soft bound and channel pruning end together
    removes_channels = True

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        density: float,
        total_steps: int,
        example_inputs: Any,
        channel_sparsity: float = 0.4,
        channel_every: int = 1000,
        channel_end: int | None = None,
        min_channel_ratio: float = 0.2,
        prune_skip: bool = False,
        prune_heads: bool = False,
        keep_channels: Sequence[str] = (),
        removal: str = "physical",
        channel_score: str = "umm",
        channel_multiple: int = 1,
        target: str = "channels",
        macs_ratio: float | None = None,
        params_ratio: float | None = None,
        latency_ratio: float | None = None,
        latency_table: Any = None,
        channel_rank: str = "score",
        update_every: int = 1000,
        soft_bound: float = 0.05,
        soft_bound_end: int | None = None,
        swap_fraction: float = 0.5,
        swap_floor: float = 0.005,
        **kwargs: Any,
    ) -> None:
        check_channel_options(
            channel_sparsity=channel_sparsity,
            min_channel_ratio=min_channel_ratio,
            removal=removal,
            channel_score=channel_score,
            channel_every=channel_every,
            channel_multiple=channel_multiple,
            target=target,
            macs_ratio=macs_ratio,
            params_ratio=params_ratio,
            latency_ratio=latency_ratio,
            latency_table=latency_table,
            channel_rank=channel_rank,
        )
        kwargs.setdefault("scope", "global")
        kwargs.setdefault("growth", "gradient")
        kwargs.setdefault("swap_horizon", total_steps)
        self.channel_sparsity = float(channel_sparsity)
        self.channel_every = int(channel_every)
        self.min_channel_ratio = float(min_channel_ratio)
        self.prune_skip = prune_skip
        self.prune_heads = bool(prune_heads)
        self.removal = removal
        self.channel_score = channel_score
        self.keep_channels = tuple(keep_channels)
        self.channel_multiple = int(channel_multiple)
        self.channel_rank = channel_rank
        self.target = target
        #: the final budget of ``target`` over the dense model's (None for target="channels").
        self.target_ratio = {"macs": macs_ratio, "params": params_ratio, "latency": latency_ratio}.get(target)
        self._latency_source = latency_table
        self.channel_offset = int(update_every) // 2
        self._channel_end_arg = channel_end
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

    def _prepare(self) -> None:
        """Channel groups, floors and the event schedule; refuses bad options before anything is changed."""
        if self._channel_end_arg is None:  # with the soft bound, and before the last update (regrowth)
            last = self.last_update_step()
            self.channel_end = min(self.soft_bound_end, last - 1) if last > 1 else self.soft_bound_end
        else:
            self.channel_end = int(self._channel_end_arg)
        like = next(iter(self._masks.params.values()))
        example_inputs = _like(self._example_inputs, like)
        del self._example_inputs  # only its shapes mattered: do not hold the user's batch
        # A one-example batch of zeros with the input's shapes: budget targets count MACs per example.
        self._probe = _zeros_like(example_inputs)
        self.pruner = ChannelPruner(
            self.module,
            example_inputs,
            self._masks.params,
            channel_sparsity=self.channel_sparsity,
            min_channel_ratio=self.min_channel_ratio,
            prune_skip=self.prune_skip,
            prune_heads=self.prune_heads,
            keep_channels=self.keep_channels,
            removal=self.removal,
            channel_multiple=self.channel_multiple,
            channel_rank=self.channel_rank,
        )
        if self._latency_source is not None:  # the option check allows it only where it is used
            self.pruner.use_latency_table(self._latency_source, self.target, self._probe)
        #: the dense model's MACs per example or parameters, which a budget target is a ratio of.
        self.dense_target_value = (
            self.pruner.measure(self.target, self._probe) if self.target_ratio is not None else None
        )
        self._region: torch.Tensor | None = None
        if self.channel_sparsity > 0 and not self.groups:
            warnings.warn("Chase found no prunable channel group: only unstructured sparsity", stacklevel=2)
        events = self._event_steps()
        #: the last channel event, where the schedule reaches channel_sparsity (at or before channel_end).
        self.last_event = events[-1] if events else 0
        if self.channel_sparsity > 0 and events and not self._update_after(self.last_event):
            raise ValueError(
                f"no exploration update comes after the last channel event (step {self.last_event}; updates "
                f"every {self.update_every} steps until end_step={self.end_step}): the weights freed by "
                "removed channels would never be regrown and the run would end below its budget. End the "
                "channel events earlier (channel_end) or explore longer (end_step)"
            )
        if self.channel_sparsity > 0 and not events:
            warnings.warn(
                f"no channel event fits before channel_end={self.channel_end} (first one at step "
                f"{self.channel_offset + self.channel_every}): only unstructured sparsity",
                stacklevel=2,
            )
        log.info("Chase: %d prunable channel groups, %d channels", len(self.groups), self.total_channels)

    # ------------------------------------------------------------------ schedule
    def is_channel_step(self, t: int) -> bool:
        """Whether a channel event is due after optimizer step ``t``: at ``offset + k * channel_every``
        (k >= 1, offset = half an exploration interval) up to ``channel_end``."""
        k, rem = divmod(t - self.channel_offset, self.channel_every)
        return self.channel_sparsity > 0 and rem == 0 and k >= 1 and t <= self.channel_end

    def _update_after(self, t: int) -> bool:
        """Whether an exploration update happens at some step after ``t``."""
        return self.last_update_step() > t

    def _event_steps(self) -> list[int]:
        first = self.channel_offset + self.channel_every
        end = min(self.channel_end, self.total_steps)
        return list(range(first, end + 1, self.channel_every))

    def target_channel_sparsity(self, t: int) -> float:
        """Fraction of prunable channels removed after the event at step ``t``: the cubic ramp
        ``S_c (1 - (1 - t/T)^3)`` with ``T`` the last event step, so the last event reaches ``S_c``."""
        return schedules.cubic_channel_sparsity(t, final=self.channel_sparsity, end=self.last_event)

    # ------------------------------------------------------------------ read-outs
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
        """With a budget target: the model's MACs or parameters allowed after the event at step ``t``,
        ``dense x (1 - (1 - ratio) (1 - (1 - t/T)^3))``; None with ``target="channels"``."""
        if self.target_ratio is None:
            return None
        ramp = schedules.cubic_channel_sparsity(t, final=1.0, end=self.last_event)
        return round(self.dense_target_value * (1.0 - (1.0 - self.target_ratio) * ramp))

    def remove_channels_now(self, t: int) -> int:
        """Run the channel event of step ``t``: remove the quota of lowest-score channels (water-filling)."""
        masks = {n: m.clone() for n, m in self._masks.masks.items()}
        agree = self._share if self._distributed() else None
        budget = self.target_value(t)
        if budget is not None:
            removed = self.pruner.remove_to_budget(
                self.target,
                budget,
                self._probe,
                self._masks.params,
                masks,
                score=self.channel_score,
                optimizer=self.optimizer,
                agree=agree,
            )
        else:
            keep = round(self.total_channels * (1.0 - self.target_channel_sparsity(t)))
            removed = self.pruner.remove(
                keep,
                self._masks.params,
                masks,
                score=self.channel_score,
                optimizer=self.optimizer,
                agree=agree,
            )
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
        if self.pruner.latency is not None:  # a resume prunes by the table the run started with
            state["latency_table"] = self.pruner.latency.to_dict()
        if self.pruner.latency_weights is not None:  # weighed on the dense model: a resume keeps them
            state["latency_weights"] = list(self.pruner.latency_weights)
        return state

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("removal") != self.removal:
            raise ValueError(
                f"state_dict was saved with removal={state.get('removal')!r}, not {self.removal!r}"
            )
        self._surgery.load_state_dict(state["surgery"])
        if "latency_table" in state:
            saved = LatencyTable.from_dict(state["latency_table"])
            if self.pruner.latency is not None and saved.to_dict() != self.pruner.latency.to_dict():
                warnings.warn(
                    "the latency table changed since the run started: the run goes on with the saved one",
                    stacklevel=3,
                )
            self.pruner.latency = saved
        if "latency_weights" in state:
            self.pruner.latency_weights = [float(w) for w in state["latency_weights"]]
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
