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
from chase.deploy import BACKENDS, deploy
from chase.graph import unwrap_model
from chase.sparse.targets import find_sparse_params
from chase.sparsifier.latency import LatencyTable
from chase.sparsifier.pruner import ChannelPruner
from chase.sparsifier.specs import ChannelSpec, resolve_specs
from chase.surgery import SurgeryState, remove_channels
from chase.timing import CallKey, alternate, module_self_times, time_forward

log = logging.getLogger(__name__)

__all__ = ["profile_latency"]


def _changed_ratio(
    dense: Mapping[CallKey, tuple[int, float]], narrow: Mapping[CallKey, tuple[int, float]]
) -> float:
    """The narrowed model's forward time over the dense one's: the dense calls' self times, with the calls
    whose work changed (a different signature, or a call only one of them makes) replaced by the narrowed
    model's. The calls that did the same work keep their dense time: their differences are the machine's
    noise, which summed over a whole model would swamp a small group's saving. A ratio of sums of times is
    never negative, however much the machine drifted between the two timings (a difference from a
    separately timed whole forward could be)."""
    total = sum(d[1] for d in dense.values())
    changed = total
    for key in dense.keys() | narrow.keys():
        d, n = dense.get(key), narrow.get(key)
        if d is not None and n is not None and d[0] == n[0]:
            continue
        changed += (n[1] if n else 0.0) - (d[1] if d else 0.0)
    return changed / total


def _ms(model: Any, x: torch.Tensor, warmup: int, repeats: int) -> float:
    return 1e3 * statistics.median(time_forward(model, x, warmup=warmup, repeats=repeats))


def _whole_ratio(dense: Any, narrow: Any, x: torch.Tensor, warmup: int, repeats: int) -> float:
    """``narrow``'s time over ``dense``'s (both deployed), timed alternately: the median of the per-repeat
    ratios."""
    time_forward(narrow, x, warmup=max(warmup, 1), repeats=0)
    times = alternate(
        {"dense": lambda: dense(x), "narrow": lambda: narrow(x)}, repeats=repeats, device=x.device
    )
    return statistics.median(n / d for n, d in zip(times["narrow"], times["dense"]))


@torch.no_grad()
def profile_latency(
    model: nn.Module,
    example_inputs: torch.Tensor,
    channels: Optional[ChannelSpec] = None,
    *,
    fractions: Sequence[float] = (0.25, 0.5, 0.75),
    dtype: str = "fp32",
    channels_last: bool = False,
    warmup: int = 2,
    repeats: int = 5,
    meta: Optional[dict[str, Any]] = None,
    backend: str = "eager",
    **flat: Any,
) -> LatencyTable:
    """Time ``model`` on ``example_inputs`` (their batch size and device) dense, then with each prunable
    group alone narrowed to ``fractions`` of its width (the group's last channels removed: the time does
    not depend on which). The groups are Chase's for the same ``channels`` (its ``prune_skip``,
    ``prune_heads`` and ``keep_channels``; ``**flat``: those as keywords, deprecated).

    A point is the dense forward time plus the change in self time (:func:`chase.timing.module_self_times`)
    of the module calls whose work the narrowing changed, each timed next to the same call of the dense
    model. The rest of the model is left out: timing the whole forward again, its run-to-run noise on a
    CPU (a few %) swamps the saving of one small group. Work that a module's own code does on tensors
    whose shapes stay the same is not seen.

    Under another ``backend`` (:data:`chase.deploy.BACKENDS`: ``inductor``, on CUDA with CUDA graphs up to
    batch 32; ``onnxruntime``; ``openvino``) a compiled model has no module calls to hook: every point is
    the narrowed model deployed as it would be served and timed whole, alternately with the dense model
    deployed the same way, and the point is the dense time plus the median difference. One deployment
    (a compile) per point: minutes per group for a large model on a CPU."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {backend!r}")
    if not fractions or not all(0.0 < f < 1.0 for f in fractions):
        raise ValueError(f"fractions must be in (0, 1), got {list(fractions)}")
    device = example_inputs.device
    base = copy.deepcopy(unwrap_model(model)).eval().to(device)
    probe = example_inputs[:1].float()
    channels, _ = resolve_specs(channels, None, flat, caller="profile_latency")
    pruner = ChannelPruner(base, probe, find_sparse_params(base), channels)
    x = example_inputs.to(DTYPES[dtype])

    def prepared(m: nn.Module) -> nn.Module:
        m = m.to(dtype=DTYPES[dtype])
        return m.to(memory_format=torch.channels_last) if channels_last else m

    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if backend == "eager":
        dense = prepared(copy.deepcopy(base))
        dense_ms = _ms(dense, x, warmup, repeats)  # the whole forward, without hooks
    else:
        served = deploy(base, example_inputs, backend=backend, dtype=dtype, channels_last=channels_last)
        dense_ms = _ms(served, example_inputs, warmup, repeats)
    groups: dict[str, tuple[list[int], list[float]]] = {}
    for i, g in enumerate(pruner.groups, 1):
        widths, ms = [], []
        if backend == "eager":  # the dense calls again next to each group's points: the machine drifts
            dense_self = module_self_times(dense, x, min(warmup, 1), repeats)
        for n in sorted({max(1, round(g.width * f)) for f in fractions}):
            if n >= g.width:
                continue
            narrow = copy.deepcopy(base)
            remove_channels(narrow, SurgeryState(narrow, [g]), {g.name: torch.arange(n, g.width)})
            if backend == "eager":
                narrow_self = module_self_times(prepared(narrow), x, min(warmup, 1), repeats)
                ratio = _changed_ratio(dense_self, narrow_self)
            else:
                point = deploy(
                    narrow, example_inputs, backend=backend, dtype=dtype, channels_last=channels_last
                )
                ratio = _whole_ratio(served, point, example_inputs, warmup, repeats)
            widths.append(n)
            ms.append(dense_ms * ratio)
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
        "prune_skip": channels.prune_skip,
        "prune_heads": channels.prune_heads,
        "keep_channels": list(channels.keep_channels),
        "repeats": repeats,
        "backend": backend,
        "method": "module self times" if backend == "eager" else f"whole forward under {backend}",
        # The model's identity for the check at use: another model may share its group names and widths.
        "params": sum(p.numel() for p in base.parameters()),
        **(meta or {}),
    }
    return LatencyTable(dense_ms, groups, info)
