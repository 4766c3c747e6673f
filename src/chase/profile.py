"""Measure a latency table (:class:`chase.sparsifier.latency.LatencyTable`): the model's forward time with
each prunable channel group narrowed alone to a few widths, on the device, dtype and batch size given."""

from __future__ import annotations

import copy
import logging
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

from chase.bench import DTYPES
from chase.graph import unwrap_model
from chase.sparse.targets import find_sparse_params
from chase.sparsifier.channel_pruning import ChannelPruner
from chase.sparsifier.latency import LatencyTable
from chase.surgery import SurgeryState, remove_channels
from chase.timing import CallKey, module_self_times, time_forward

log = logging.getLogger(__name__)

__all__ = ["profile_latency"]


def _changed_time(
    dense: Mapping[CallKey, tuple[int, float]], narrow: Mapping[CallKey, tuple[int, float]]
) -> float:
    """Seconds the narrowed model's forward takes more than the dense one's, summed over the module calls
    whose work changed (a different signature, or a call only one of them makes). The calls that did the
    same work are left out: their differences are the machine's noise, which summed over a whole model
    would swamp a small group's saving."""
    total = 0.0
    for key in dense.keys() | narrow.keys():
        d, n = dense.get(key), narrow.get(key)
        if d is not None and n is not None and d[0] == n[0]:
            continue
        total += (n[1] if n else 0.0) - (d[1] if d else 0.0)
    return total


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
    ``keep_channels``.

    A point is the dense forward time plus the change in self time (:func:`chase.timing.module_self_times`)
    of the module calls whose work the narrowing changed, each timed next to the same call of the dense
    model. The rest of the model is left out: timing the whole forward again, its run-to-run noise on a
    CPU (a few %) swamps the saving of one small group. Work that a module's own code does on tensors
    whose shapes stay the same is not seen."""
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
    dense_ms = _ms(dense, x, warmup, repeats)  # the whole forward, without hooks
    groups: dict[str, tuple[list[int], list[float]]] = {}
    for i, g in enumerate(pruner.groups, 1):
        widths, ms = [], []
        # The dense calls again next to each group's points: the machine drifts over a long profile.
        dense_self = module_self_times(dense, x, min(warmup, 1), repeats)
        for n in sorted({max(1, round(g.width * f)) for f in fractions}):
            if n >= g.width:
                continue
            narrow = copy.deepcopy(base)
            remove_channels(narrow, SurgeryState(narrow, [g]), {g.name: torch.arange(n, g.width)})
            changed = _changed_time(
                dense_self, module_self_times(prepared(narrow), x, min(warmup, 1), repeats)
            )
            widths.append(n)
            ms.append(dense_ms + 1e3 * changed)
        groups[g.name] = ([*widths, g.width], [*ms, dense_ms])
        # Progress as it goes: a CPU profile of a large model takes minutes.
        points_ms = ", ".join(f"{w}: {t:.2f}" for w, t in zip(*groups[g.name]))
        log.info("profiled group %d/%d %s (width: ms) %s", i, len(pruner.groups), g.name, points_ms)
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
        "method": "module self times",
        # The model's identity for the check at use: another model may share its group names and widths.
        "params": sum(p.numel() for p in base.parameters()),
        **(meta or {}),
    }
    return LatencyTable(dense_ms, groups, info)
