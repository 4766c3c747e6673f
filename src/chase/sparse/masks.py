"""Masks for the sparse weights, stored in one flat buffer so global ranking needs no per-layer copies."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
from torch import nn


class MaskSet:
    """Boolean masks keyed by parameter FQN, each a view into one flat buffer.

    ``flat`` (bool) is the truth; ``scale`` holds the same masks in the parameters' dtype, because
    ``weight.mul_(float_mask)`` runs about twice as fast as multiplying by a bool tensor and this runs
    after every optimizer step.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]):
        self.params = dict(params)
        self.names = list(self.params)
        self.rebuild(masks)

    def rebuild(self, masks: Mapping[str, torch.Tensor]) -> None:
        """(Re)allocate the flat buffer from ``masks`` (after loading, or after a change of shapes)."""
        first = self.params[self.names[0]]
        for name in self.names:
            if tuple(masks[name].shape) != tuple(self.params[name].shape):
                raise ValueError(
                    f"mask for {name} has shape {tuple(masks[name].shape)}, "
                    f"the parameter {tuple(self.params[name].shape)}"
                )
        self.numels = [math.prod(self.params[n].shape) for n in self.names]
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self.flat = torch.cat([masks[n].reshape(-1).to(first.device, torch.bool) for n in self.names])
        self.scale = torch.empty(0)
        self.sync_views()

    def sync_views(self) -> None:
        """Refresh the per-layer views and the float copy after ``flat`` changed."""
        self.masks = {
            n: self.flat[o : o + k].view(self.params[n].shape)
            for n, o, k in zip(self.names, self.offsets, self.numels)
        }
        dtype = self.params[self.names[0]].dtype
        if self.scale.shape != self.flat.shape or self.scale.device != self.flat.device:
            self.scale = torch.empty(self.flat.shape, dtype=dtype, device=self.flat.device)
        self.scale.copy_(self.flat)
        self._scales = [
            self.scale[o : o + k].view(self.params[n].shape)
            for n, o, k in zip(self.names, self.offsets, self.numels)
        ]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def counts(self) -> list[int]:
        """Kept weights per layer, in ``names`` order (one device sync for all layers)."""
        return torch.stack([m.sum() for m in self.masks.values()]).tolist()

    def follow_device(self) -> None:
        """Move the buffers if the model was moved after the masks were built."""
        device = self.params[self.names[0]].device
        if self.flat.device != device:
            self.flat = self.flat.to(device)
            self.scale = torch.empty(0)
            self.sync_views()

    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the weights, and every optimizer state tensor shaped like a weight, at masked positions."""
        self.follow_device()
        if self.params[self.names[0]].dtype != self.scale.dtype:  # the model was cast after construction
            self.sync_views()
        self._multiply(self._scales, optimizer)

    @torch.no_grad()
    def restart(self, positions: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Set the weights, and their optimizer state, to 0 where the flat bool ``positions`` is True
        (kept or not): a weight grown there starts afresh, as a newly grown weight does."""
        self.follow_device()
        keep = (~positions.to(self.flat.device)).to(self.scale.dtype)
        views = zip(self.names, self.offsets, self.numels)
        self._multiply([keep[o : o + k].view(self.params[n].shape) for n, o, k in views], optimizer)

    def _multiply(self, scales: list[torch.Tensor], optimizer: torch.optim.Optimizer | None) -> None:
        params = [self.params[n] for n in self.names]
        torch._foreach_mul_(params, scales)
        if optimizer is None:
            return
        states, state_scales = [], []
        for p, s in zip(params, scales):
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.is_floating_point():
                    states.append(value)
                    state_scales.append(s if value.dtype == s.dtype else s.to(value.dtype))
        if states:
            torch._foreach_mul_(states, state_scales)
