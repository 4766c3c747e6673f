"""Chase: dynamic sparse training that removes whole channels while it trains (Yin et al., NeurIPS 2023)."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from chase.graph import ChannelGraph, channel_groups
from chase.graph.types import ChannelGroup
from chase.sparse import schedules
from chase.sparse.channels import CHANNEL_SCORES, channel_score, water_fill
from chase.sparse.targets import matches
from chase.sparsifier.base import Sparsifier, StepInfo
from chase.sparsifier.dry_run import breaking_groups
from chase.surgery import SurgeryState, alive_mask, removal_problem, remove_channels, replay, zero_removed

log = logging.getLogger(__name__)

REMOVAL_MODES = ("physical", "mask")
SLIM_FORMAT_VERSION = 1  # must match chase.export


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
        keep_channels: fnmatch patterns of layers (module or parameter names, as ``dense_layers``) whose
            output channels are never pruned: their whole channel group leaves the prunable set, and
            ``channel_sparsity`` counts the remaining groups only. The paper keeps the stem of ResNet-50
            (``["conv1"]``) and VGG-19's last conv, which feeds the classifier. Each pattern must match
            a prunable group.
        removal: ``"physical"`` or ``"mask"``.
        channel_score: ``"umm"`` (paper), ``"kept_mean"`` or ``"density"`` (ablations).
        update_every: exploration interval (the paper's Delta T_p, 1000).
        soft_bound: MEST's delta0 (0.05); soft_bound_end: step where delta reaches 0 (default 0.8 x total,
            or the last update step if that comes earlier).
        swap_fraction, swap_floor: after the soft bound, RigL swaps
            ``swap_floor + (swap_fraction - swap_floor)(1 + cos(pi t / total_steps))/2`` of the budget.
        **kwargs: any other :class:`Sparsifier` option (distribution, dense_layers, seed, ...).
    """

    soft_bound_end_fraction = 0.8  # the paper's T_chan: soft bound and channel pruning end together

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
        keep_channels: Sequence[str] = (),
        removal: str = "physical",
        channel_score: str = "umm",
        update_every: int = 1000,
        soft_bound: float = 0.05,
        soft_bound_end: int | None = None,
        swap_fraction: float = 0.5,
        swap_floor: float = 0.005,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= channel_sparsity < 1.0:
            raise ValueError(f"channel_sparsity must be in [0, 1), got {channel_sparsity}")
        if not 0.0 <= min_channel_ratio <= 1.0:
            raise ValueError(f"min_channel_ratio must be in [0, 1], got {min_channel_ratio}")
        if channel_every < 1:
            raise ValueError(f"channel_every must be >= 1, got {channel_every}")
        if removal not in REMOVAL_MODES:
            raise ValueError(f"removal must be one of {REMOVAL_MODES}, got {removal!r}")
        if channel_score not in CHANNEL_SCORES:
            raise ValueError(f"channel_score must be one of {CHANNEL_SCORES}, got {channel_score!r}")
        kwargs.setdefault("scope", "global")
        kwargs.setdefault("growth", "gradient")
        kwargs.setdefault("swap_horizon", total_steps)
        self.channel_sparsity = float(channel_sparsity)
        self.channel_every = int(channel_every)
        self.min_channel_ratio = float(min_channel_ratio)
        self.prune_skip = prune_skip
        self.removal = removal
        self.channel_score = channel_score
        self.keep_channels = tuple(keep_channels)
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
        self.graph: ChannelGraph = channel_groups(self.module, example_inputs, prune_skip=self.prune_skip)
        groups = [
            g for g in self.graph.prunable() if any(s.tensor in self._masks.params for s in g.producers)
        ]
        self.groups = _without_kept(groups, self.keep_channels)
        inexact = [g.name for g in self.groups if not g.exact]
        if self.removal == "mask" and inexact:
            raise ValueError(
                f"removal='mask' cannot represent removing channels that pass through a channel-mixing norm "
                f"(LayerNorm/GroupNorm over channels) in group(s) {inexact[:3]}: zeroed channels would still "
                "count in its statistics. Use removal='physical' (default) or prune_skip=False"
            )
        self._surgery = SurgeryState(self.module, self.groups)
        # A group whose removal some module cannot follow (a custom module recording its width, say) or
        # that breaks the forward pass (a width held in Python, e.g. a reshape to another tensor's size)
        # is refused now, with the reason, rather than failing at the first channel event.
        refused = {
            g.name: why for g in self.groups if (why := removal_problem(self.module, self._surgery, g.name))
        }
        left = [g for g in self.groups if g.name not in refused]
        for name, error in breaking_groups(self.module, left, example_inputs).items():
            refused[name] = f"removing a channel breaks the forward pass ({error})"
        if refused:
            warnings.warn(
                f"Chase keeps {len(refused)} channel group(s) whose layers cannot be narrowed: "
                + "; ".join(f"{n}: {why}" for n, why in list(refused.items())[:3])
                + (" ..." if len(refused) > 3 else ""),
                stacklevel=3,
            )
            self.groups = [g for g in self.groups if g.name not in refused]
            self._surgery = SurgeryState(self.module, self.groups)
        self.refused_groups = refused
        # A grouped conv's channels go in units of `unit` channels (see the graph); S_c counts channels.
        self._units = [g.unit for g in self.groups]
        self.total_channels = sum(g.width * u for g, u in zip(self.groups, self._units))
        # The paper's floor int(C (1 - S_c) beta), and never an empty layer.
        self._floors = [
            max(1, int(g.width * (1 - self.channel_sparsity) * self.min_channel_ratio)) for g in self.groups
        ]
        # Filter size of each producer before any input channel was removed: UMM divides by it.
        self._row_numel = {
            s.tensor: self._masks.params[s.tensor][0].numel() for g in self.groups for s in g.producers
        }
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
    def alive_channels(self) -> dict[str, int]:
        """Alive channels (units, for a group of grouped-conv units) per prunable group."""
        return {g.name: self._surgery.current_width(g.name) for g in self.groups}

    def _alive_total(self) -> int:
        """Alive prunable channels, every unit counted with its channels."""
        return sum(self._surgery.current_width(g.name) * u for g, u in zip(self.groups, self._units))

    def channel_sparsity_now(self) -> float:
        """Fraction of prunable channels removed so far."""
        if not self.total_channels:
            return 0.0
        return 1.0 - self._alive_total() / self.total_channels

    # ------------------------------------------------------------------ channel events
    def _after_step(self, t: int, info: StepInfo) -> None:
        if self.is_channel_step(t):
            info.channels_removed = self.remove_channels_now(t)
            info.shapes_changed = self.removal == "physical" and info.channels_removed > 0

    def _scores(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Scores of every alive channel of every prunable group, their group ids, and per group the
        original ids of its alive channels (in score order)."""
        scores, gids, ids = [], [], []
        for i, g in enumerate(self.groups):
            alive = self._surgery.alive_channels(g.name)
            per_producer = []
            for s in g.producers:
                if s.tensor not in self._masks.params:
                    continue  # a producer kept dense by dense_layers still scores through its siblings
                w = self._masks.params[s.tensor]
                sc = channel_score(w, self._masks[s.tensor], self._row_numel[s.tensor], self.channel_score)
                # This group's rows only: a producer may also carry other groups' channels (its output is
                # concatenated, or added to a concatenation), and in mask mode removed rows remain.
                # A grouped-conv unit owns several rows: its score is their mean (UMM stays a mean).
                rows = self._surgery.slot_positions(g.name, s.tensor, sliced=self.removal == "physical")
                per_producer.append(sc[rows.to(sc.device)].mean(1))
            score = torch.stack(per_producer).mean(0)
            scores.append(score)
            gids.append(torch.full_like(score, i, dtype=torch.long))
            ids.append(alive.nonzero().squeeze(1))
        return torch.cat(scores), torch.cat(gids), ids

    @torch.no_grad()
    def remove_channels_now(self, t: int) -> int:
        """Run the channel event of step ``t``: remove the quota of lowest-score channels (water-filling)."""
        alive = [self._surgery.current_width(g.name) for g in self.groups]
        keep = round(self.total_channels * (1.0 - self.target_channel_sparsity(t)))
        quota = self._alive_total() - keep  # in channels; a unit costs its channels
        if quota <= 0:
            return 0
        caps = [max(0, a - f) for a, f in zip(alive, self._floors)]
        scores, gids, ids = self._scores()
        chosen = water_fill(scores.float().cpu(), gids.cpu(), caps, quota, costs=self._units)
        if self._distributed():  # every rank removes rank 0's choice (same shape on all ranks)
            picked = torch.zeros(scores.numel(), dtype=torch.bool)
            picked[chosen] = True
            chosen = self._share(picked).nonzero().squeeze(1)
        chosen_gids = gids.cpu()[chosen]
        # Position of each chosen channel inside its group's alive list -> its original channel id.
        starts = torch.tensor([0, *alive]).cumsum(0)[:-1]
        local = chosen - starts[chosen_gids]
        removals = {}
        for i, g in enumerate(self.groups):
            sel = local[chosen_gids == i]
            if sel.numel():
                removals[g.name] = ids[i][sel]
        masks = {n: m.clone() for n, m in self._masks.masks.items()}
        if self.removal == "physical":
            remove_channels(self.module, self._surgery, removals, optimizer=self.optimizer, masks=masks)
        else:
            self._surgery.mark_removed(removals)
            zero_removed(self.module, self._surgery, optimizer=self.optimizer, masks=masks)
        self._masks.rebuild(masks)
        self._region = None
        self._broadcast_masks()
        self._masks.apply(self.optimizer)
        removed = int(chosen.numel())
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
        return state

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("removal") != self.removal:
            raise ValueError(
                f"state_dict was saved with removal={state.get('removal')!r}, not {self.removal!r}"
            )
        self._surgery.load_state_dict(state["surgery"])
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

    def slim_checkpoint(self) -> dict[str, Any]:
        """``{"history", "model"}``: the exported model's weights and the removal history that reshapes a
        freshly built model to fit them (see :func:`chase.load_slim`); plain tensors only."""
        return {
            "format_version": 1,
            "history": self._surgery.state_dict(),
            "model": self.export().state_dict(),
        }


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


def _like(obj: Any, ref: torch.Tensor) -> Any:
    """``obj`` with its tensors on ``ref``'s device, floating ones in ``ref``'s dtype (so an example input
    made on the CPU in fp32 works for a model on CUDA or in fp64)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(ref.device, ref.dtype if obj.is_floating_point() else obj.dtype)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_like(o, ref) for o in obj)
    if isinstance(obj, dict):
        return {k: _like(v, ref) for k, v in obj.items()}
    return obj
