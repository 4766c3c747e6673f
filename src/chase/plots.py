"""The figures of a run: accuracy, layer widths, channel densities and the amenable family.

matplotlib is optional and imported when a figure is drawn (its Agg canvas, no pyplot: no global figure
state, no display backend); without it every function raises ``ImportError`` saying what to install.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["plot_accuracy", "plot_amenable_curve", "plot_channel_densities", "plot_widths"]


def _figure(size: tuple[float, float]) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plots need matplotlib (pip install matplotlib)") from e
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: pathlib.Path) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_accuracy(epochs: Sequence[Mapping[str, Any]], path: pathlib.Path) -> None:
    """Train and test accuracy per epoch (``epoch`` records of ``metrics.jsonl``)."""
    fig = _figure((6, 3.5))
    ax = fig.subplots()
    ax.plot([r["epoch"] for r in epochs], [r["test_acc"] for r in epochs], label="test")
    ax.plot([r["epoch"] for r in epochs], [r["train_acc"] for r in epochs], label="train")
    ax.set(xlabel="epoch", ylabel="accuracy")
    ax.legend()
    _save(fig, path)


def plot_widths(before: Mapping[str, int], after: Mapping[str, int], path: pathlib.Path) -> None:
    """Output channels of every layer before (grey) and after training."""
    fig = _figure((max(6, 0.15 * len(after)), 3.5))
    ax = fig.subplots()
    idx = range(len(after))
    ax.bar(idx, [before.get(n, w) for n, w in after.items()], color="lightgray", label="before")
    ax.bar(idx, list(after.values()), label="after")
    ax.set(xlabel="layer", ylabel="output channels")
    ax.legend()
    _save(fig, path)


def plot_amenable_curve(
    curve: Mapping[float, Sequence[tuple[int, float]]], path: pathlib.Path, title: str = ""
) -> None:
    """The amenable family over training steps, one line per ratio (see ``chase.analysis``)."""
    fig = _figure((6.5, 4))
    ax = fig.subplots()
    for r, points in sorted(curve.items(), reverse=True):
        ax.plot(
            [p[0] for p in points],
            [100 * p[1] for p in points],
            marker=".",
            label=f"density < {r:g} x layer's",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("% of sparse conv channels")
    ax.set_title(title or "sparse amenable channels")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_channel_densities(stats: Any, path: pathlib.Path, title: str = "") -> None:
    """Histogram of all channel densities, and per-layer box plots with each layer's density marked
    (``stats``: :class:`chase.ChannelStats`)."""
    layers = [s for s in stats.layers if s.density.numel()]
    fig = _figure((12, 4.5))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2]})
    if layers:
        everything = torch.cat([s.density for s in layers]).numpy()
        ax1.hist(everything, bins=40, color="tab:blue")
        ax2.boxplot([s.density.numpy() for s in layers], showfliers=True)
        ax2.plot(
            range(1, len(layers) + 1), [s.layer_density for s in layers], "D", ms=4, label="layer density"
        )
        ax2.legend(loc="upper right")
    ax1.set_xlabel("channel density (kept / original filter size)")
    ax1.set_ylabel("channels")
    ax1.set_title(f"all channels: {100 * stats.amenable_fraction:.1f}% sparse amenable")
    ax2.set_xlabel("sparse layer (in model order)")
    ax2.set_ylabel("channel density")
    ax2.set_title(title)
    _save(fig, path)
