"""Remove channels physically: the one call the sparsifier makes at a channel-pruning event."""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping

import torch
from torch import nn

from chase.surgery.slicing import check_attributes, slice_tensors
from chase.surgery.state import ChannelIds, SurgeryState

logger = logging.getLogger(__name__)


def remove_channels(
    model: nn.Module,
    state: SurgeryState,
    removals: Mapping[str, ChannelIds],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    masks: MutableMapping[str, torch.Tensor] | None = None,
) -> set[str]:
    """Slice the channels ``removals`` (group name -> ORIGINAL channel ids) out of ``model``, in place.

    All removals of one call are merged first, so every tensor is sliced once per dim even when several
    groups share it (a conv consuming a concat). The same ``nn.Parameter`` objects stay in the model; their
    gradients, the optimizer's per-parameter state tensors of full parameter shape and ``masks[name]`` are
    sliced alongside, and module attributes (``out_channels``, ``num_features``, ...) follow the new shapes.
    Already-removed ids are ignored. On error (unknown group, an unsupported layer such as a grouped conv)
    nothing is changed.

    Returns:
        Names of the parameters and buffers whose shape changed.
    """
    plan = state.plan(removals)
    if not plan:
        return set()
    changed = slice_tensors(model, plan.keep, optimizer=optimizer, masks=masks)
    state.commit(plan)
    logger.debug(
        "removed channels: %s",
        ", ".join(f"{g} -> {state.current_width(g)}/{state.original_width(g)}" for g in plan.channels),
    )
    return changed


def removal_problem(model: nn.Module, state: SurgeryState, group: str) -> str:
    """Why removing a channel of ``group`` would fail (a module whose attributes cannot follow the new
    shapes), or ``""`` when it would work. Nothing is changed: the check runs the rules on the planned
    shapes of one channel's removal."""
    alive = state.alive_channels(group).nonzero().flatten()
    if alive.numel() < 2:
        return ""
    try:
        check_attributes(model, state.plan({group: alive[:1]}).keep)
    except ValueError as e:
        return str(e)
    return ""
