"""The unstructured DST algorithms: the same engine with each paper's defaults.

Every keyword of :class:`~chase.sparsifier.base.Sparsifier` can be passed to override a default.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from chase.sparsifier.base import Sparsifier


class _Preset(Sparsifier):
    end_fraction: ClassVar[float] = 0.75  # RigL stops exploring after 75% of training

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        density: float,
        total_steps: int,
        **kwargs: Any,
    ) -> None:
        options = {**self.defaults, **kwargs}
        super().__init__(model, optimizer, density=density, total_steps=total_steps, **options)


class Static(_Preset):
    """Static sparse training: a fixed random mask (ERK by default), never updated."""

    explores = False


class SET(_Preset):
    """SET (Mocanu et al. 2018): prune smallest |w|, regrow at random, per layer.

    Defaults: ERK, per-layer, swap fraction 0.3 with cosine decay (the schedule RigL used for its SET
    baseline; pass ``swap_schedule="constant"`` for the original), update every 100 steps until 75%.
    """

    defaults: ClassVar[dict[str, Any]] = {"growth": "random", "scope": "layer", "swap_fraction": 0.3}


class RigL(_Preset):
    """RigL (Evci et al. 2020): prune smallest |w|, regrow largest |gradient|.

    Defaults: ERK, per-layer, swap fraction 0.3 with cosine decay, update every 100 steps until 75% of
    ``total_steps``. ``scope="global"`` ranks all layers together.
    """

    defaults: ClassVar[dict[str, Any]] = {"growth": "gradient", "scope": "layer", "swap_fraction": 0.3}


class MEST(_Preset):
    """MEST with its soft memory bound (Yuan et al. 2021), as Chase uses it.

    Between updates the network holds ``d + delta(t)`` of the original weights, ``delta`` decaying by
    cosine from ``soft_bound`` (0.05) to 0 at ``soft_bound_end`` (default: ``end_step``). Each update
    prunes back to ``d`` by |w| and grows to ``d + delta(t)`` by |gradient|, globally; afterwards RigL
    swaps at a constant budget.
    """

    defaults: ClassVar[dict[str, Any]] = {
        "growth": "gradient",
        "scope": "global",
        "swap_fraction": 0.3,
        "soft_bound": 0.05,
    }
