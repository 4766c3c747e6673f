"""One-shot channel pruning: the removal a Chase channel event makes, run once on a model
(:func:`prune_channels`), and the untrained widths that timing and FLOP counts use
(:func:`untrained_slim`)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from chase.graph import unwrap_model
from chase.nested import like
from chase.sparse.distribution import layer_counts, random_masks
from chase.sparse.targets import find_sparse_params
from chase.sparsifier.pruner import ChannelPruner
from chase.sparsifier.specs import Budget, ChannelSpec, resolve_specs

log = logging.getLogger(__name__)

__all__ = ["INIT_DENSITY", "PrunedChannels", "prune_channels", "untrained_label", "untrained_slim"]

#: density at which an untrained width is chosen: the paper's d (what Chase sees at its first event).
INIT_DENSITY = 0.1


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
    channels: Optional[ChannelSpec] = None,
    budget: Optional[Budget] = None,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    dense_layers: Sequence[str] = (),
    **flat: Any,
) -> PrunedChannels:
    """One-shot global channel pruning, in place: by the same groups, scores, floors, ranking and surgery as
    a Chase channel event, remove ``channels.channel_sparsity`` of the prunable channels of ``model`` or,
    with a ``budget`` (``Budget.macs(0.5)``, ``.params``, ``.latency``), channels until the model's
    measure is that ratio of what it was (``channel_sparsity`` then only sets the floors).

    Channels are scored on the weights of the sparse layers (Conv/Linear minus ``dense_layers``) times
    ``masks`` (parameter name -> bool tensor; missing names are dense, as is everything when ``masks`` is
    None). The model is narrowed physically; build its optimizer afterwards. Save the result with
    ``chase.slim.make_slim(model, history=result.history)``. The schedule fields of ``channels`` do not
    apply. ``**flat``: the flat options of earlier releases (``channel_sparsity=0.5, target="macs",
    macs_ratio=0.5``; deprecated, see :class:`~chase.ChannelSpec`).
    """
    channels, budget = resolve_specs(channels, budget, flat, caller="prune_channels")
    if channels.removal != "physical":
        raise ValueError("prune_channels removes channels physically: removal='mask' does not apply")
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
    example = like(example_inputs, next(iter(params.values())))
    pruner = ChannelPruner(module, example, params, channels)
    before = pruner.alive_channels()
    if budget.cost is not None:  # the specs' check allows a cost model only where it is used
        pruner.use_cost(budget.cost, budget.kind, example)
    if budget.ratio is not None:
        target = round(pruner.measure(budget.kind, example) * budget.ratio)
        pruner.remove_to_budget(budget.kind, target, example, params, work)
    else:
        keep = round(pruner.total_channels * (1.0 - channels.channel_sparsity))
        pruner.remove(keep, params, work)
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
    channel_sparsity: Optional[float] = None,
    prune_skip: Optional[bool] = None,
    density: float = INIT_DENSITY,
    *,
    channels: Optional[ChannelSpec] = None,
    budget: Optional[Budget] = None,
    **flat: Any,
) -> nn.Module:
    """A copy of ``model`` narrowed at once to Chase's final width for ``channels`` (and ``budget``). The
    channels are chosen as Chase chooses at its first event: by their score on the current (e.g. random)
    weights masked at ``density`` (ERK masks, drawn as a Chase with seed 0 draws them), not on the dense
    weights; the copy keeps those masked weights. For timing and FLOPs only: it is not a trained model.
    ``channel_sparsity``, ``prune_skip`` and ``**flat`` are the deprecated flat options."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    for name, value in (("channel_sparsity", channel_sparsity), ("prune_skip", prune_skip)):
        if value is not None:
            flat[name] = value
    channels, budget = resolve_specs(channels, budget, flat, caller="untrained_slim")
    work = copy.deepcopy(unwrap_model(model))
    params = find_sparse_params(work)
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    masks = random_masks(shapes, layer_counts(shapes, density, "erk"), torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m.to(params[n].device))
    prune_channels(work, example_inputs, channels=channels, budget=budget, masks=masks)
    return work.eval()


def untrained_label(
    channels: ChannelSpec, budget: Optional[Budget] = None, density: float = INIT_DENSITY
) -> str:
    """What an :func:`untrained_slim` model is, for every table that reports one."""
    options = ", ".join(p for p in (channels.describe(), budget.describe() if budget else "") if p)
    return (
        f"UNTRAINED width: Chase {options or 'defaults'}, all removed at once, channels ranked by "
        f"{channels.channel_score} of the initial weights masked at density {density} (ERK)"
    )
