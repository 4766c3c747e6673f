"""Per-channel statistics of a sparse model: densities, UMM, and the share of "sparse amenable" channels."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from chase.sparse.channels import channel_score
from chase.sparse.targets import unwrap_model
from chase.sparsifier.base import Sparsifier


@dataclass
class LayerChannelStats:
    """One sparse layer's output channels (rows of its weight).

    Attributes:
        name: parameter name.
        density: per-channel kept weights / the channel's ORIGINAL filter size.
        umm: per-channel unmasked mean magnitude (mean |w| over the original filter).
        layer_density: the layer's kept weights / the original size of its current rows (its original
            size unless channels were physically removed).
        amenable: per-channel flag: density below ``amenable_ratio * layer_density``.
    """

    name: str
    density: torch.Tensor
    umm: torch.Tensor
    layer_density: float
    amenable: torch.Tensor

    @property
    def amenable_fraction(self) -> float:
        return float(self.amenable.float().mean()) if self.amenable.numel() else 0.0


@dataclass
class ChannelStats:
    """Channel statistics of all sparse layers; ``amenable_fraction`` pools every channel."""

    layers: list[LayerChannelStats] = field(default_factory=list)
    amenable_ratio: float = 0.5

    @property
    def channels(self) -> int:
        return sum(layer.density.numel() for layer in self.layers)

    @property
    def amenable_fraction(self) -> float:
        total = self.channels
        return sum(int(layer.amenable.sum()) for layer in self.layers) / total if total else 0.0

    def summary(self) -> str:
        lines = [
            f"{self.channels} channels in {len(self.layers)} sparse layers; "
            f"{100 * self.amenable_fraction:.1f}% sparse amenable "
            f"(channel density < {self.amenable_ratio} x its layer's density)",
            f"  {'layer':<40} {'ch':>5} {'layer d':>8} {'min d':>7} {'max d':>7} {'amenable':>9}",
        ]
        for s in self.layers:
            lines.append(
                f"  {s.name:<40} {s.density.numel():>5} {s.layer_density:>8.3f} "
                f"{float(s.density.min()):>7.3f} {float(s.density.max()):>7.3f} "
                f"{100 * s.amenable_fraction:>8.1f}%"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@torch.no_grad()
def channel_stats(model: nn.Module, sparsifier: Sparsifier, *, amenable_ratio: float = 0.5) -> ChannelStats:
    """Per-channel densities and UMMs of every sparse layer of ``model`` under ``sparsifier``'s masks.

    The paper observes that unstructured DST leaves many channels far sparser than their layer ("sparse
    amenable" channels, up to 60%). Here a channel counts as sparse amenable when its density is below
    ``amenable_ratio`` times its layer's density (0.5 by default): an operational definition, stated with
    every figure this library reports. Works for any sparsifier (RigL, SET, MEST, Chase); ``model`` is
    accepted for symmetry and must be the sparsifier's model.
    """
    if unwrap_model(model) is not sparsifier.module:
        raise ValueError("model is not the sparsifier's model")
    stats = ChannelStats(amenable_ratio=amenable_ratio)
    for name, mask in sparsifier.masks.items():
        weight = sparsifier.module.get_parameter(name)
        row = math.prod(sparsifier.dense_shapes[name][1:])
        density = channel_score(weight, mask, row, "density").float().cpu()
        umm = channel_score(weight, mask, row, "umm").float().cpu()
        # Over the channels the layer still has: after a physical shrink, removed rows are not "sparse".
        layer_density = int(mask.sum()) / (weight.shape[0] * row)
        stats.layers.append(
            LayerChannelStats(name, density, umm, layer_density, density < amenable_ratio * layer_density)
        )
    return stats
