"""Reshape a freshly built (full-size) model to a recorded surgery state, so a slim checkpoint loads."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from chase.surgery.slicing import slice_tensors
from chase.surgery.state import STATE_VERSION, _lookup_tensor

logger = logging.getLogger(__name__)


def replay(model: nn.Module, history: Mapping[str, Any]) -> set[str]:
    """Slice ``model``'s tensors to the alive positions recorded in ``history`` and fix module attributes.

    ``history`` is :meth:`SurgeryState.state_dict` (also after ``torch.load(weights_only=True)``). Each
    tensor dim must be at its original size (it is then sliced) or already at the alive size (left as is),
    so replaying twice is harmless. Weights are not loaded: call ``model.load_state_dict(slim)`` after.
    Build the optimizer after replay (no optimizer state is touched).

    Returns:
        Names of the parameters and buffers whose shape changed.
    """
    version = history.get("version")
    if version != STATE_VERSION:
        raise ValueError(f"unsupported surgery state version {version!r}")
    keep: dict[str, dict[int, torch.Tensor]] = {}
    for name, dims in history["tensors"].items():
        tensor = _lookup_tensor(model, name)
        for d, alive in dims.items():
            d = int(d)
            alive = alive.to("cpu", torch.bool)
            n, n_alive = tensor.shape[d], int(alive.sum())
            if n == n_alive:
                continue  # already at the recorded width (or nothing removed)
            if n != alive.numel():
                raise ValueError(
                    f"{name!r} dim {d} has size {n}: neither original ({alive.numel()}) nor alive ({n_alive})"
                )
            keep.setdefault(name, {})[d] = alive.nonzero().flatten()
    changed = slice_tensors(model, keep)
    logger.info("replayed surgery history: %d tensors reshaped", len(changed))
    return changed
