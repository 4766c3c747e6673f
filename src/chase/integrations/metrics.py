"""The numbers the framework callbacks log: one owner for their names and how they are counted.

``density`` (kept weights over the dense size); for a sparsifier that removes channels also
``channel_sparsity``, ``params`` and, given an example input, ``macs`` of the deployable model (the model
itself after physical removal, its export in mask mode, where the trained model keeps its shapes), and
``params_ratio`` / ``macs_ratio`` against the first count of the run.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from chase.flops import count_flops
from chase.nested import tensors
from chase.sparsifier import Sparsifier

__all__ = ["SparsityMetrics", "narrows"]


def narrows(sparsifier: Sparsifier) -> bool:
    """Whether the sparsifier physically removes channels from the model it trains."""
    return sparsifier.removes_channels and getattr(sparsifier, "removal", None) == "physical"


def _placed(example: Any, param: torch.Tensor) -> Any:
    """``example`` on ``param``'s device, floating tensors in its dtype (a model moved or converted by
    the framework since the input was found)."""

    def place(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(param.device, param.dtype if t.is_floating_point() else t.dtype)

    if isinstance(example, dict):
        return {k: place(v) for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(place(t) for t in example)
    return place(example)


class SparsityMetrics:
    """Density, channel sparsity, parameters and MACs of a sparsifier's model, recounted on request.

    Args:
        example_inputs: one input (tensor, tuple of arguments or dict of keyword arguments) to count MACs
            on; None: no MACs.
    """

    def __init__(self, example_inputs: Any = None) -> None:
        self.example_inputs = example_inputs
        self.values: dict[str, float] = {}
        self.first: dict[str, float] = {}  # the run's first counts: the ratios' denominators

    def update(self, sparsifier: Sparsifier, *, recount: bool) -> dict[str, float]:
        """The metrics now; ``recount``: count parameters and MACs again (after a channel event: they
        change only then). Returns a copy."""
        self.values["density"] = float(sparsifier.global_density())
        if sparsifier.removes_channels:
            self.values["channel_sparsity"] = float(sparsifier.channel_sparsity_now())
            if recount or "params" not in self.values:
                self._count(sparsifier.module if narrows(sparsifier) else sparsifier.export())
        return dict(self.values)

    def _count(self, model: nn.Module) -> None:
        self.values["params"] = float(sum(p.numel() for p in model.parameters()))
        if self.example_inputs is not None and any(True for _ in tensors(self.example_inputs)):
            with torch.no_grad():
                report = count_flops(model, _placed(self.example_inputs, next(model.parameters())))
            self.values["macs"] = float(report.dense)
        for key in ("params", "macs"):
            if key in self.values:
                first = self.first.setdefault(key, self.values[key])
                self.values[f"{key}_ratio"] = self.values[key] / first if first else 1.0

    def state_dict(self) -> dict[str, float]:
        return dict(self.first)

    def load_state_dict(self, state: Optional[dict[str, float]]) -> None:
        self.first = dict(state or {})
