"""Torch-Pruning's view: coupled groups from its DependencyGraph, as plain (layer, role, index) items.

Torch-Pruning (MIT, github.com/VainF/Torch-Pruning) builds a dependency graph from the autograd graph of
one forward pass and, asked to prune some channels of a layer, returns every coupled dimension with the
positions mapped through concatenations and flattens. We ask it for ALL channels of a root layer and read
each item's positions together with the root channel they belong to (``root_idxs``): that pairing is what
turns Torch-Pruning's flat index lists into our ``index[j] = positions of root channel j``. Nothing here
modifies the model (we never call Torch-Pruning's pruning functions, which replace ``nn.Parameter``s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch_pruning as tp
from torch import nn

from chase.graph.trace import Trace, trace_model

CONV = nn.modules.conv._ConvNd
_OUTPUT_OP = getattr(tp.ops, "_OutputOp", ())  # Torch-Pruning's marker for model outputs (newer versions)
NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.PReLU,
    getattr(nn, "RMSNorm", nn.LayerNorm),
)


@dataclass
class Item:
    """One coupled dimension in a Torch-Pruning group.

    ``name`` is the FQN of a layer (``role`` producer/consumer/depthwise/norm) or of a free parameter
    (``role == "param"``, channels along ``dim``); ``index`` is ``LongTensor[width, k]`` or None when
    Torch-Pruning's positions do not split evenly over the root channels.
    """

    name: str
    role: str
    index: Optional[torch.Tensor]
    dim: int = 0


@dataclass
class TPGroup:
    """All items Torch-Pruning couples to the output (``side="out"``) or input channels of ``root``."""

    root: str
    side: str
    width: int
    items: list[Item]
    problems: list[str]  # e.g. layers with weights that Torch-Pruning couples but we have no rule for
    output: bool  # Torch-Pruning reached one of its output markers


def is_depthwise(m: nn.Module) -> bool:
    """A conv whose every output channel reads exactly its own input channel."""
    return isinstance(m, CONV) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def has_channel_tensors(m: nn.Module) -> bool:
    """Whether a norm/PReLU layer holds per-channel tensors."""
    if isinstance(m, nn.PReLU):
        return m.num_parameters > 1
    return any(isinstance(getattr(m, a, None), torch.Tensor) for a in ("weight", "bias", "running_mean"))


def build(model: nn.Module, example_inputs: Any) -> tuple[tp.DependencyGraph, Trace]:
    """Trace ``model`` once, feeding the same forward pass to our recorder and to Torch-Pruning."""
    dg = tp.DependencyGraph()

    def run(forward: Callable[[], Any]) -> None:
        dg.build_dependency(
            model, example_inputs=example_inputs, forward_fn=lambda _m, _x: forward(), verbose=False
        )

    try:
        trace = trace_model(model, example_inputs, run)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"torch-pruning could not build a dependency graph of the model: {e}") from e
    return dg, trace


def roots(dg: tp.DependencyGraph, model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv and linear layers that took part in the traced forward, in module order."""
    return [
        (n, m) for n, m in model.named_modules() if isinstance(m, (CONV, nn.Linear)) and m in dg.module2node
    ]


def _index(idxs: list[int], root_idxs: Optional[list[int]], width: int) -> Optional[torch.Tensor]:
    if root_idxs is None:  # very old Torch-Pruning: only safe when the mapping is the identity
        root_idxs = list(range(width)) if len(idxs) == width else [None] * len(idxs)
    per_root: list[list[int]] = [[] for _ in range(width)]
    for i, r in zip(idxs, root_idxs):
        if r is None or not 0 <= r < width:
            return None
        per_root[r].append(int(i))
    sizes = {len(p) for p in per_root}
    if len(sizes) != 1 or 0 in sizes:
        return None
    return torch.tensor([sorted(p) for p in per_root], dtype=torch.long).reshape(width, -1)


def group(dg: tp.DependencyGraph, names: dict[Any, str], module: nn.Module, side: str) -> TPGroup:
    """Torch-Pruning's group for all output (or input) channels of ``module``."""
    pruner = dg.get_pruner_of_module(module)
    if side == "out":
        fn, width = pruner.prune_out_channels, pruner.get_out_channels(module)
    else:
        fn, width = pruner.prune_in_channels, pruner.get_in_channels(module)
    try:
        g = dg.get_pruning_group(module, fn, list(range(width)))
    except Exception as e:  # a graph Torch-Pruning cannot map: keep the layer, say why
        return TPGroup(
            names[module], side, width, [], [f"torch-pruning failed on '{names[module]}': {e}"], False
        )
    items: list[Item] = []
    problems: list[str] = []
    output = False
    for it in g:
        target = it.dep.target
        obj, idxs = target.module, list(it.idxs)
        index = _index(idxs, getattr(it, "root_idxs", None), width)
        is_out = dg.is_out_channel_pruning_fn(it.dep.handler)
        is_in = dg.is_in_channel_pruning_fn(it.dep.handler)
        if isinstance(obj, nn.Parameter):
            items.append(Item(names.get(id(obj), "?"), "param", index, target.pruning_dim))
        elif isinstance(obj, (CONV, nn.Linear)):
            if is_depthwise(obj):
                role = "depthwise"
            elif is_out and not is_in:
                role = "producer"
            else:
                role = "consumer"
            items.append(Item(names[obj], role, index))
        elif isinstance(obj, NORMS):
            if has_channel_tensors(obj):  # PReLU with one slope, norms without affine/stats: nothing to slice
                items.append(Item(names[obj], "norm", index))
        elif isinstance(obj, _OUTPUT_OP):
            output = True
        elif isinstance(obj, nn.Module) and obj in names and any(True for _ in obj.parameters(recurse=False)):
            problems.append(f"layer '{names[obj]}' ({type(obj).__name__}) has weights with no channel rule")
    return TPGroup(names[module], side, width, items, problems, output)


def covered(g: TPGroup) -> tuple[set[str], set[str]]:
    """Layers whose output / input channels ``g`` already accounts for."""
    outs = {i.name for i in g.items if i.role in ("producer", "depthwise")}
    ins = {i.name for i in g.items if i.role in ("consumer", "depthwise")}
    return outs, ins
