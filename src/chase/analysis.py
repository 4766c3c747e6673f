"""Per-channel statistics of a sparse model: densities, UMM, and the share of "sparse amenable" channels.

The paper (abstract) reports that unstructured DST leaves "a large fraction of channels (up to 60%) being
sparser than others". Its Section 3 definition could not be retrieved here (the stored copies of the paper
return only its opening), so this module measures a FAMILY of readings and says which one it reports: a
channel counts at ratio ``r`` when its density is below ``r`` times its own layer's density, over the
output channels of the convolutions that are sparse (not the classifier or any Linear layer, not layers
the distribution made dense). ``r = 1`` ("sparser than its layer") is the abstract's wording; a random mask
already puts about half of a layer's channels there, so the curve over training against its value at
initialisation is what shows the phenomenon, and smaller ``r`` count channels far sparser than their layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from chase.graph import unwrap_model
from chase.sparse.channels import channel_score
from chase.sparsifier.base import Sparsifier

#: the ratios of the amenable family (channel density < r x its layer's density).
AMENABLE_RATIOS = (1.0, 0.75, 0.5, 0.25)


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
        conv: the layer is a convolution (its weight has more than two dims).
    """

    name: str
    density: torch.Tensor
    umm: torch.Tensor
    layer_density: float
    amenable: torch.Tensor
    conv: bool = True

    @property
    def counted(self) -> bool:
        """Whether the amenable family counts this layer: a convolution that is sparse (density < 1)."""
        return self.conv and self.layer_density < 1.0

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

    def fractions(self, ratios: tuple[float, ...] = AMENABLE_RATIOS) -> dict[float, float]:
        """``{r: share of channels with density < r x their layer's}``, over the output channels of the
        sparse convolutions only (see the module docstring); 0.0 when there is none."""
        counted = [s for s in self.layers if s.counted and s.density.numel()]
        total = sum(s.density.numel() for s in counted)
        out = {}
        for r in ratios:
            below = sum(int((s.density < r * s.layer_density).sum()) for s in counted)
            out[r] = below / total if total else 0.0
        return out

    @property
    def counted_channels(self) -> int:
        """Channels :meth:`fractions` counts."""
        return sum(s.density.numel() for s in self.layers if s.counted)

    def summary(self) -> str:
        lines = [
            f"{self.channels} channels in {len(self.layers)} sparse layers; "
            f"{100 * self.amenable_fraction:.1f}% sparse amenable "
            f"(channel density < {self.amenable_ratio} x its layer's density)",
            f"  {'layer':<40} {'ch':>5} {'layer d':>8} {'min d':>7} {'max d':>7} {'amenable':>9}",
        ]
        family = ", ".join(f"< {r:g}x: {100 * f:.1f}%" for r, f in self.fractions().items())
        lines.insert(
            1, f"  sparse conv channels ({self.counted_channels}) with density {family} of their layer's"
        )
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
        amenable = density < amenable_ratio * layer_density
        stats.layers.append(LayerChannelStats(name, density, umm, layer_density, amenable, weight.ndim > 2))
    return stats


def amenable_key(ratio: float) -> str:
    """The metrics key of one ratio of the amenable family (``amenable_1``, ``amenable_0.5``, ...)."""
    return f"amenable_{ratio:g}"


def amenable_record(sparsifier: Sparsifier, ratios: tuple[float, ...] = AMENABLE_RATIOS) -> dict[str, Any]:
    """The amenable family of ``sparsifier``'s model now, as flat metrics fields (the trainer logs one at
    the start and after every mask update; :func:`amenable_curve` reads them back)."""
    stats = channel_stats(sparsifier.module, sparsifier)
    rec: dict[str, Any] = {amenable_key(r): f for r, f in stats.fractions(ratios).items()}
    rec["amenable_channels"] = stats.counted_channels
    return rec


def amenable_curve(records: Sequence[dict[str, Any]]) -> dict[float, list[tuple[int, float]]]:
    """``{ratio: [(step, fraction), ...]}`` from a run's metrics records (the ``channels`` records)."""
    out: dict[float, list[tuple[int, float]]] = {}
    for rec in records:
        if rec.get("kind") != "channels":
            continue
        for key, value in rec.items():
            if key.startswith("amenable_") and key != "amenable_channels":
                out.setdefault(float(key[len("amenable_") :]), []).append((rec["step"], value))
    return out
