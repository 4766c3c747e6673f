"""Torch-Pruning's view: coupled groups from its DependencyGraph, as plain (layer, role, index) items.

Torch-Pruning (MIT, github.com/VainF/Torch-Pruning) builds a dependency graph from the autograd graph of
one forward pass and, asked to prune some channels of a layer, returns every coupled dimension with the
positions mapped through concatenations and flattens. We ask it for ALL channels of a root layer and read
each item's positions together with the root channel they belong to (``root_idxs``): that pairing is what
turns Torch-Pruning's flat index lists into our ``index[j] = positions of root channel j``. Nothing here
modifies the model (we never call Torch-Pruning's pruning functions, which replace ``nn.Parameter``s).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from chase.graph.trace import Trace, trace_model

log = logging.getLogger(__name__)

CONV = nn.modules.conv._ConvNd


def _tp() -> Any:
    """Torch-Pruning, imported on first use: it imports timm (and so torchvision) when those are installed,
    and ``import chase`` stays light."""
    import torch_pruning

    return torch_pruning


def _output_op() -> Any:
    """Torch-Pruning's marker type for model outputs (newer versions; an empty tuple matches nothing)."""
    return getattr(_tp().ops, "_OutputOp", ())


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


#: the ``failed`` lists of the active :func:`tolerant_reshape_mapping` contexts (to explain kept groups).
_UNMAPPED: list[list[str]] = []
#: the most channel positions one group query may map through reshapes (see tolerant_reshape_mapping).
MAX_MAPPED_POSITIONS = 1 << 17
_CREATED = [0]  # positions mapped by the current group query


class MappingTooLarge(RuntimeError):
    """A group query stopped because Torch-Pruning's position lists grew without bound."""


@contextlib.contextmanager
def tolerant_reshape_mapping(failed: list[str]) -> Iterator[None]:
    """Guards around Torch-Pruning's index mapping, for one graph build and its group queries.

    - Torch-Pruning maps channel positions through every reshape, concatenation, split, ...; on some
      (ShuffleNet's channel shuffle, a view that splits the channel dim into groups; a deep Swin whose
      shape inference gives up) that mapping raises and takes the whole graph down. Here a mapping that
      fails is left out and recorded in ``failed`` (once); our own op rules then disagree with
      Torch-Pruning about the groups through it, so those stay kept (their reason names it) and the rest
      of the model is still pruned.
    - It recomputes every mapping of the whole graph at each group query (``get_pruning_group``), which
      makes discovery quadratic in the model's size; the graph does not change between our queries, so
      the mapping is computed once per graph.
    - Through a reshape it expands every channel position into ``stride`` positions, and through a chain
      of reshapes (Swin's window partitions, a channel shuffle) the lists multiply until memory runs out.
      A query that would create more than :data:`MAX_MAPPED_POSITIONS` positions is stopped; its group is
      kept with that reason. Legitimate mappings (a conv flattened into a linear layer: channels x H x W
      positions) stay far below the bound.
    - Its group query asks, for every dependency it walks, whether the group already holds it with the
      same positions, by comparing with every item so far (``Group.has_pruning_op``): quadratic in the
      group's size, with lists of positions compared each time. Through an FPN whose shared heads run
      once per level, that took minutes per group (a ResNet-18-FPN Faster R-CNN: 109 of 116 s of
      discovery). Here the group keeps a set of what it holds, with the same answers.
    """
    mod = importlib.import_module("torch_pruning.dependency.index_mapping")
    update = getattr(mod, "update_index_mapping", None)
    if update is None:  # another Torch-Pruning layout: nothing to guard
        yield
        return
    # Every per-op mapping (reshape, concat, split, unbind, expand, slice, flatten): one that fails (a
    # channel shuffle's view; a deep Swin whose shape inference gives up and returns None) is skipped.
    # Torch-Pruning then maps those positions as the identity, which our op rules contradict, so the
    # groups through it are kept; the rest of the model is unaffected.
    per_op = {
        n: f
        for n, f in vars(mod).items()
        if n.startswith("update_") and n.endswith("_index_mapping") and n != "update_index_mapping"
    }
    mapped: set[int] = set()
    flatten = getattr(mod, "_FlattenIndexMapping", None)
    expand = flatten.__call__ if flatten is not None else None

    def bounded_expand(self: Any, idxs: Any) -> Any:
        grows = 1 if getattr(self, "reverse", True) else int(getattr(self, "_stride", 1))
        _CREATED[0] += len(idxs) * grows
        if _CREATED[0] > MAX_MAPPED_POSITIONS:
            raise MappingTooLarge(
                f"its channel positions multiply through reshapes past {MAX_MAPPED_POSITIONS:,} "
                "(window partitions or a channel shuffle on the way)"
            )
        return expand(self, idxs)

    def guard(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(graph: Any, node: Any) -> None:
            try:
                fn(graph, node)
            except Exception as e:  # any failure of one mapping, not of the graph
                note = f"{getattr(node, 'name', node)} ({name[len('update_') : -len('_index_mapping')]}): {e}"
                if note not in failed:
                    failed.append(note)

        return guarded

    split = per_op.get("update_split_index_mapping")
    split_map = getattr(mod, "_SplitIndexMapping", None)
    if split is not None and split_map is not None:
        per_op["update_split_index_mapping"] = _split_on_last_dim(split, split_map)

    def update_once(graph: Any) -> None:
        if id(graph) not in mapped:
            update(graph)
            mapped.add(id(graph))

    group_cls = importlib.import_module("torch_pruning.dependency.group").Group
    has_op = group_cls.__dict__.get("has_pruning_op")

    def indexed_has_op(self: Any, dep: Any, idxs: Any) -> bool:
        held = self.__dict__.setdefault("_chase_held", [0, set()])
        for item in self._group[held[0] :]:  # items added since the last question (add_dep appends)
            held[1].add((item.dep.target, item.dep.handler, tuple(item.idxs)))
        held[0] = len(self._group)
        try:
            return (dep.target, dep.handler, tuple(idxs)) in held[1]
        except TypeError:  # positions that do not hash: Torch-Pruning's own comparison
            return has_op(self, dep, idxs)

    for name, fn in per_op.items():
        setattr(mod, name, guard(name, fn))
    mod.update_index_mapping = update_once
    if flatten is not None:
        flatten.__call__ = bounded_expand
    if has_op is not None:
        group_cls.has_pruning_op = indexed_has_op
    _UNMAPPED.append(failed)
    try:
        yield
    finally:
        for name, fn in per_op.items():
            setattr(mod, name, fn)
        if has_op is not None:
            group_cls.has_pruning_op = has_op
        mod.update_index_mapping = update
        if flatten is not None:
            flatten.__call__ = expand
        _UNMAPPED.remove(failed)


def _split_on_last_dim(update: Callable[..., Any], mapping: type) -> Callable[..., Any]:
    """Torch-Pruning's split mapping, also for a split along the last dim of a tensor with more than two
    dims: that is a linear layer's feature dim (a SwiGLU's fused projection over (batch, tokens,
    features), cut into value and gate), which Torch-Pruning maps as the identity (and, in a model with
    a 3-d parameter such as a ViT's position embedding, it turns split mapping off altogether, for splits
    along the tokens). Each output of the split is mapped to its slice of the input, and back."""

    def mapped(graph: Any, node: Any) -> None:
        update(graph, node)
        fn = getattr(node, "grad_fn", None)
        sizes, dim = getattr(fn, "_saved_self_sym_sizes", None), getattr(fn, "_saved_dim", None)
        offsets = getattr(getattr(node, "module", None), "offsets", None)
        if sizes is None or dim is None or offsets is None:
            return
        dim = dim - (1 << 64) if dim >= 1 << 63 else dim  # autograd saves -1 as an unsigned 64-bit int
        if len(sizes) <= 2 or dim not in (-1, len(sizes) - 1):
            return
        for i, out in enumerate(node.outputs):
            span = offsets[i : i + 2]
            forward = next((d for d in node.dependencies if d.target is out), None)
            back = next((d for d in out.dependencies if d.target is node), None)
            if forward is not None:
                forward.index_mapping[0] = mapping(offset=span, reverse=False)
            if back is not None:
                back.index_mapping[0] = mapping(offset=span, reverse=True)

    return mapped


def build(model: nn.Module, example_inputs: Any, *, keep_mode: bool = False) -> tuple[Any, Trace]:
    """Trace ``model`` once, feeding the same forward pass to our recorder and to Torch-Pruning (call it,
    and query the groups, inside :func:`tolerant_reshape_mapping`).

    Torch-Pruning puts the model in eval mode before its forward; with ``keep_mode`` the forward runs in
    the mode the model is in (training: auxiliary heads run and are traced too).
    """
    dg = _tp().DependencyGraph()

    def run(forward: Callable[[], Any]) -> None:
        if keep_mode:  # shadow Module.eval on this instance for the duration of the build
            model.__dict__["eval"] = lambda: model
        try:
            dg.build_dependency(
                model, example_inputs=example_inputs, forward_fn=lambda _m, _x: forward(), verbose=False
            )
        finally:
            model.__dict__.pop("eval", None)

    try:
        trace = trace_model(model, example_inputs, run)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"torch-pruning could not build a dependency graph of the model: {e}") from e
    return dg, trace


def roots(dg: Any, model: nn.Module) -> list[tuple[str, nn.Module]]:
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


def group(dg: Any, names: dict[Any, str], module: nn.Module, side: str) -> TPGroup:
    """Torch-Pruning's group for all output (or input) channels of ``module``."""
    pruner = dg.get_pruner_of_module(module)
    if side == "out":
        fn, width = pruner.prune_out_channels, pruner.get_out_channels(module)
    else:
        fn, width = pruner.prune_in_channels, pruner.get_in_channels(module)
    _CREATED[0] = 0
    try:
        g = dg.get_pruning_group(module, fn, list(range(width)))
    except MappingTooLarge as e:
        return TPGroup(names[module], side, width, [], [f"'{names[module]}': {e}"], False)
    except Exception as e:  # a graph Torch-Pruning cannot map: keep the layer, say why
        why = f"torch-pruning failed on '{names[module]}': {e}"
        unmapped = [note for notes in _UNMAPPED for note in notes]
        if unmapped:  # the likely cause: a reshape it could not map (e.g. a channel shuffle)
            why += f" (it could not map channels through {len(unmapped)} reshape(s), e.g. {unmapped[0]})"
        return TPGroup(names[module], side, width, [], [why], False)
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
        elif isinstance(obj, nn.MultiheadAttention) and obj.in_proj_weight is not None:
            if not any(i.name == names[obj] and i.role == "attention" for i in items):
                items.append(Item(names[obj], "attention", index))
        elif isinstance(obj, nn.Embedding):  # its weight's dim 1 is the embedding width
            items.append(Item(f"{names[obj]}.weight" if names[obj] else "weight", "param", index, 1))
        elif isinstance(obj, NORMS):
            if has_channel_tensors(obj):  # PReLU with one slope, norms without affine/stats: nothing to slice
                items.append(Item(names[obj], "norm", index))
        elif isinstance(obj, _output_op()):
            output = True
        elif isinstance(obj, nn.Module) and obj in names and any(True for _ in obj.parameters(recurse=False)):
            problems.append(f"layer '{names[obj]}' ({type(obj).__name__}) has weights with no channel rule")
    return TPGroup(names[module], side, width, items, problems, output)


def covered(g: TPGroup) -> tuple[set[str], set[str]]:
    """Layers whose output / input channels ``g`` already accounts for."""
    outs = {i.name for i in g.items if i.role in ("producer", "depthwise")}
    ins = {i.name for i in g.items if i.role in ("consumer", "depthwise")}
    return outs, ins
