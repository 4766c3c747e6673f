"""Measure a latency table (:class:`chase.sparsifier.latency.LatencyTable`): the model's forward time with
each prunable channel group narrowed alone to a few widths, on the device, dtype and batch size given."""

from __future__ import annotations

import copy
import logging
import statistics
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from chase.bench import DTYPES
from chase.graph import unwrap_model
from chase.sparse.targets import find_sparse_params
from chase.sparsifier.channel_pruning import ChannelPruner
from chase.sparsifier.latency import LatencyTable
from chase.surgery import SurgeryState, remove_channels
from chase.timing import alternate, time_forward

log = logging.getLogger(__name__)

__all__ = ["profile_latency"]


def _ms(model: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> float:
    return 1e3 * statistics.median(time_forward(model, x, warmup=warmup, repeats=repeats))


@torch.no_grad()
def profile_latency(
    model: nn.Module,
    example_inputs: torch.Tensor,
    *,
    prune_skip: bool = False,
    prune_heads: bool = False,
    keep_channels: Sequence[str] = (),
    fractions: Sequence[float] = (0.25, 0.5, 0.75),
    dtype: str = "fp32",
    channels_last: bool = False,
    warmup: int = 2,
    repeats: int = 5,
    meta: Optional[dict[str, Any]] = None,
) -> LatencyTable:
    """Time ``model`` on ``example_inputs`` (their batch size and device) dense, then with each prunable
    group alone narrowed to ``fractions`` of its width (the group's last channels removed: the time does
    not depend on which). The groups are Chase's for the same ``prune_skip``/``prune_heads``/
    ``keep_channels``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if not fractions or not all(0.0 < f < 1.0 for f in fractions):
        raise ValueError(f"fractions must be in (0, 1), got {list(fractions)}")
    device = example_inputs.device
    base = copy.deepcopy(unwrap_model(model)).eval().to(device)
    probe = example_inputs[:1].float()
    pruner = ChannelPruner(
        base,
        probe,
        find_sparse_params(base),
        channel_sparsity=0.0,
        prune_skip=prune_skip,
        prune_heads=prune_heads,
        keep_channels=keep_channels,
    )
    x = example_inputs.to(DTYPES[dtype])

    def prepared(m: nn.Module) -> nn.Module:
        m = m.to(dtype=DTYPES[dtype])
        return m.to(memory_format=torch.channels_last) if channels_last else m

    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dense = prepared(copy.deepcopy(base))
    _ms(dense, x, warmup, 1)  # warm-up (allocator, kernel choice) before any timed point
    points: dict[str, list[tuple[int, float]]] = {}
    dense_times: list[float] = []
    for g in pruner.groups:
        for n in sorted({max(1, round(g.width * f)) for f in fractions}):
            if n >= g.width:
                continue
            narrow = copy.deepcopy(base)
            state = SurgeryState(narrow, [g])
            remove_channels(narrow, state, {g.name: torch.arange(n, g.width)})
            narrow = prepared(narrow)
            # Timed alternately with the dense model: the ratio survives a drifting machine.
            t = alternate(
                {"dense": lambda: dense(x), "narrow": lambda m=narrow: m(x)},
                warmup=warmup,
                repeats=repeats,
                device=x.device,
            )
            dense_times += t["dense"]
            points.setdefault(g.name, []).append(
                (n, statistics.median(t["narrow"]) / statistics.median(t["dense"]))
            )
    # Every point is a ratio to the dense model timed next to it; the dense time is the median of all
    # those dense timings, so one slow moment of the machine does not scale the whole table.
    dense_ms = 1e3 * statistics.median(dense_times) if dense_times else _ms(dense, x, warmup, repeats)
    groups: dict[str, tuple[list[int], list[float]]] = {}
    for g in pruner.groups:
        pts = points.get(g.name, [])
        groups[g.name] = ([n for n, _ in pts] + [g.width], [dense_ms * r for _, r in pts] + [dense_ms])
        log.info("profiled %s: %s", g.name, dict(zip(*groups[g.name])))
    info = {
        "device": str(device),
        "dtype": dtype,
        "batch_size": int(example_inputs.shape[0]),
        "input": list(example_inputs.shape[1:]),
        "channels_last": channels_last,
        "prune_skip": prune_skip,
        "prune_heads": prune_heads,
        "keep_channels": list(keep_channels),
        "repeats": repeats,
        **(meta or {}),
    }
    return LatencyTable(dense_ms, groups, info)
