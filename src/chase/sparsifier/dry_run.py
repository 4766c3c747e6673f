"""A shape dry run: which channel groups can lose a channel without breaking the model's forward pass?

The channel graph proves which tensors carry a group's channels, but a model may also hold a width in
Python: ``x.reshape(B, G, P, D)`` with ``D`` read from another tensor's shape (MaxViT's attention), a
stored size used in a ``view``. Removing a channel then breaks the forward pass, or would, at the first
channel event. This check removes one channel of every group from a copy of the model on the ``meta``
device (shapes only: no memory for weights, no arithmetic) and runs the forward pass; when that fails,
it bisects to the groups that break it. Nothing of the real model is touched.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from chase.graph.trace import prepare_inputs
from chase.graph.types import ChannelGroup
from chase.surgery import SurgeryState, remove_channels

log = logging.getLogger(__name__)


def meta_copy(module: nn.Module) -> nn.Module:
    """``module`` with every parameter and buffer replaced by an empty tensor on the meta device."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def _forward(module: nn.Module, example_inputs: Any) -> str:
    """Run the meta copy's forward; the error text, or "" when it ran."""
    args, kwargs, _ = prepare_inputs(example_inputs)
    to_meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t  # noqa: E731
    try:
        with torch.no_grad():
            module(*[to_meta(a) for a in args], **{k: to_meta(v) for k, v in kwargs.items()})
    except Exception as e:  # any failure is the answer
        return f"{type(e).__name__}: {e}"
    return ""


def _trial(module: nn.Module, groups: Sequence[ChannelGroup], example_inputs: Any) -> str:
    work = meta_copy(module)
    removable = [g for g in groups if g.width > 1]
    if removable:
        state = SurgeryState(work, removable)
        remove_channels(work, state, {g.name: [0] for g in removable})
    return _forward(work, example_inputs)


def breaking_groups(module: nn.Module, groups: Sequence[ChannelGroup], example_inputs: Any) -> dict[str, str]:
    """``{group name: the forward pass's error}`` for the groups whose channel removal breaks the forward
    pass (empty when all can shrink, or when the model cannot run on the meta device at all)."""
    if not groups:
        return {}
    baseline = _trial(module, [], example_inputs)
    if baseline:  # data-dependent control flow, an op without a meta kernel, ...: no verdict
        log.debug("shape dry run skipped: the model does not run on the meta device (%s)", baseline)
        return {}
    broken: dict[str, str] = {}

    def search(subset: Sequence[ChannelGroup], error: str) -> None:
        if len(subset) == 1:
            broken[subset[0].name] = error
            return
        half = len(subset) // 2
        found = False
        for part in (subset[:half], subset[half:]):
            err = _trial(module, part, example_inputs)
            if err:
                found = True
                search(part, err)
        if not found:  # only the combination fails: keep them all, conservatively
            broken.update({g.name: error for g in subset})

    error = _trial(module, groups, example_inputs)
    if error:
        search(list(groups), error)
    return broken
