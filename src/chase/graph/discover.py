"""``channel_groups``: find every coupled channel group of a model from one example forward pass.

Two views of the same forward pass are combined. Torch-Pruning's dependency graph says which layer
dimensions are coupled and maps positions through concatenations and flattens; our op rules
(:mod:`chase.graph.rules`, walked by :mod:`chase.graph.propagate`) follow the channel dimension through
every recorded torch call and catch what the autograd graph cannot show (a mean over channels, a
permute, a LayerNorm across channels, a broadcast). A group is marked prunable only if both views agree
on every layer and every position, and nothing on the way forbids removing a channel.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Optional

import torch
from torch import nn

from chase.graph import tp_groups
from chase.graph.channel_graph import ChannelGraph
from chase.graph.heads import attention_layouts, head_sides, with_head_groups
from chase.graph.propagate import Reach, propagate
from chase.graph.rule_base import ChanState
from chase.graph.trace import Trace, prepare_inputs, unwrap_model
from chase.graph.types import ChannelGroup, Slot

log = logging.getLogger(__name__)

RESIDUAL_REASON = "residual stream; pass prune_skip=True"
_LAYER_OPS = (
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "linear",
)
# Tensors of a layer that carry its channels, per role: (attribute, dim, slot role).
_LAYER_TENSORS = {
    "producer": (("weight", 0, "producer"), ("bias", 0, "param")),
    "consumer": (("weight", 1, "consumer"),),
    "depthwise": (("weight", 0, "depthwise"), ("bias", 0, "param")),
    "norm": (
        ("weight", 0, "param"),
        ("bias", 0, "param"),
        ("running_mean", 0, "param"),
        ("running_var", 0, "param"),
    ),
    # nn.MultiheadAttention on the embedding channels: its packed input projection reads them (columns),
    # its output projection writes them (rows).
    "attention": (
        ("in_proj_weight", 1, "consumer"),
        ("out_proj.weight", 0, "producer"),
        ("out_proj.bias", 0, "param"),
    ),
}


def channel_groups(
    model: nn.Module, example_inputs: Any, *, prune_skip: bool = False, prune_heads: bool = False
) -> ChannelGraph:
    """Discover the channel groups of ``model`` by tracing it on ``example_inputs``.

    Args:
        model: any ``nn.Module``; DistributedDataParallel and ``torch.compile`` wrappers are unwrapped and
            tensor names are relative to the unwrapped module.
        example_inputs: a tensor, a tuple/list of positional arguments, or a dict of keyword arguments.
        prune_skip: also allow removing channels of the residual stream (all coupled layers together) and
            channels normalized together by a LayerNorm ("Chase (prune skip)").
        prune_heads: allow removing whole attention heads (groups of ``kind="heads"``,
            :mod:`chase.graph.heads`); without it they are listed but kept.

    Returns:
        A :class:`ChannelGraph` holding one :class:`ChannelGroup` per coupled set of channels.

    Raises:
        ValueError: the model cannot be run or traced on ``example_inputs``.

    The model is traced in its current mode: a model in training mode (as one is before training) shows
    the layers that run only in training, such as auxiliary heads, whose inputs must shrink with the
    channels they read. If that forward fails (e.g. a BatchNorm over one value per channel), it is traced
    in eval mode with a warning that such layers are not seen. The model is left as it was: same
    parameter objects and values, BatchNorm statistics untouched, no hooks, no gradients, and every
    module's train/eval mode restored.
    """
    model = unwrap_model(model)
    modes = {m: m.training for m in model.modules()}
    hooks = {m: (set(m._forward_hooks), set(m._forward_pre_hooks)) for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]  # a training-mode trace updates them
    failed: list[str] = []
    try:
        with tp_groups.tolerant_reshape_mapping(failed):
            try:
                train_inputs = _two_samples(example_inputs) if model.training else example_inputs
                dg, trace = tp_groups.build(model, train_inputs, keep_mode=model.training)
            except ValueError as e:
                if not model.training:
                    raise
                warnings.warn(
                    f"channel discovery could not run the model in training mode ({e}); it traced it in "
                    "eval mode, so layers that run only in training (auxiliary heads) are not seen: their "
                    "inputs would not shrink with the channels they read",
                    stacklevel=2,
                )
                _restore(modes, buffers)
                train_inputs = example_inputs
                dg, trace = tp_groups.build(model, example_inputs, keep_mode=False)
            groups = _groups(model, dg, trace, prune_skip, prune_heads, train_inputs)
    finally:
        _restore(modes, buffers)
        _drop_new_hooks(hooks)
    for note in failed:
        log.info("torch-pruning could not map channels through reshape %s: groups through it stay kept", note)
    graph = ChannelGraph(groups, prune_skip=prune_skip, prune_heads=prune_heads)
    log.info(
        "channel groups: %d found, %d prunable (prune_skip=%s, prune_heads=%s)",
        len(graph),
        len(graph.prunable()),
        prune_skip,
        prune_heads,
    )
    return graph


def _two_samples(obj: Any) -> Any:
    """The example with every batch-of-one tensor repeated to two samples: BatchNorm in training mode
    needs more than one value per channel (an auxiliary head pooled to 1x1 has only the batch)."""
    if isinstance(obj, torch.Tensor):
        return torch.cat([obj, obj]) if obj.dim() > 0 and obj.shape[0] == 1 else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_two_samples(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _two_samples(v) for k, v in obj.items()}
    return obj


@torch.no_grad()
def _restore(modes: dict[nn.Module, bool], buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for m, training in modes.items():
        m.training = training
    for b, saved in buffers:
        if b.shape == saved.shape:
            b.copy_(saved)


def _drop_new_hooks(before: dict[nn.Module, tuple[set[int], set[int]]]) -> None:
    """Remove hooks added since ``before`` (Torch-Pruning leaves its own behind when the forward raises)."""
    for m, (fwd, pre) in before.items():
        for k in set(m._forward_hooks) - fwd:
            del m._forward_hooks[k]
            getattr(m, "_forward_hooks_with_kwargs", {}).pop(k, None)
            getattr(m, "_forward_hooks_always_called", {}).pop(k, None)
        for k in set(m._forward_pre_hooks) - pre:
            del m._forward_pre_hooks[k]
            getattr(m, "_forward_pre_hooks_with_kwargs", {}).pop(k, None)


def _groups(
    model: nn.Module, dg: Any, trace: Trace, prune_skip: bool, prune_heads: bool, inputs: Any
) -> list[ChannelGroup]:
    modules = dict(model.named_modules())
    names: dict[Any, str] = {m: n for n, m in reversed(list(model.named_modules()))}
    names.update({id(p): n for n, p in reversed(list(model.named_parameters()))})
    layer_calls: dict[str, list[int]] = {}
    for c in trace.calls:  # a layer run several times: its calls carry the same channels
        if c.op in _LAYER_OPS or c.op == "multi_head_attention_forward":
            layer_calls.setdefault(c.module, []).append(c.index)
    layouts = attention_layouts(model, {c.module for c in trace.calls})
    skip = head_sides(layouts)
    done_out: set[str] = {layer for layer, side in skip if side == "out"}
    done_in: set[str] = {layer for layer, side in skip if side == "in"}
    raw, deferred = [], []
    roots = tp_groups.roots(dg, model)
    for side in ("out", "in"):
        for name, m in roots:
            if name in (done_out if side == "out" else done_in):
                continue
            g = tp_groups.group(dg, names, m, side)
            if not g.problems and any(i.index is None for i in g.items):
                # The layer's channels do not map one-to-one onto a consumer's: a split of them (a GLU's
                # value and gate halves, through a depthwise conv or not). A consumer's input group holds
                # the real units; this group stands only if no other group takes the layer's channels.
                deferred.append(g)
                continue
            outs, ins = tp_groups.covered(g)
            done_out |= outs
            done_in |= ins
            raw.append(g)
    for g in deferred:  # the ones no group took, each once
        if g.root not in (done_out if g.side == "out" else done_in):
            outs, ins = tp_groups.covered(g)
            done_out |= outs
            done_in |= ins
            raw.append(g)
    order = {n: i for i, (n, _) in enumerate(roots)}
    raw.sort(key=lambda g: (order[g.root], g.side == "in"))
    groups = [_translate(g, modules, trace, layer_calls, prune_skip, model, inputs) for g in raw]
    groups = with_head_groups(model, groups, layouts, prune_heads=prune_heads)
    _check_disjoint(groups)
    return groups


def _root_reach(
    g: tp_groups.TPGroup, modules: dict[str, nn.Module], trace: Trace, layer_calls: dict[str, list[int]]
) -> Reach:
    calls = layer_calls.get(g.root, [])
    if not calls:
        reach = Reach()
        reach.problems.append(f"layer '{g.root}' was not called through a conv/linear op")
        return reach
    call = trace.calls[calls[0]]
    if g.side == "out":
        port, shape = -1, call.out_shapes[0]
    else:
        port, shape = 0, call.inputs[0].shape
    dim = len(shape) - 1 if call.op == "linear" else 1
    return propagate(trace, modules, call.index, port, ChanState(dim, 0, g.width), layer_calls)


def _translate(
    g: tp_groups.TPGroup,
    modules: dict[str, nn.Module],
    trace: Trace,
    layer_calls: dict[str, list[int]],
    prune_skip: bool,
    model: nn.Module,
    inputs: Any,
) -> ChannelGroup:
    """One Torch-Pruning group -> one ChannelGroup, checked against the op rules."""
    reach = _root_reach(g, modules, trace, layer_calls)
    problems = list(g.problems) + reach.problems
    tp_keys = {(i.name, i.role) for i in g.items if i.role != "param"}
    tp_params = {i.name for i in g.items if i.role == "param"}
    if not problems and (tp_keys != set(reach.layers) or tp_params != set(reach.params)):
        diff = sorted(f"{n} ({r})" for n, r in tp_keys ^ set(reach.layers)) + sorted(
            tp_params ^ set(reach.params)
        )
        problems.append(f"torch-pruning and the op rules disagree about {', '.join(diff[:3])}")
    slots: list[Slot] = []
    for item in g.items:
        slots += _slots(item, modules, reach, problems)
    for name, st in reach.buffers.items():
        slots.append(Slot(name, name.rpartition(".")[0], st.dim, st.positions(), "param"))
    width = g.width
    if reach.grouped and not problems:
        slots, width = _grouped_units(g, slots, modules, reach, problems)
    if reach.sized and not problems and not _follows_narrower(model, inputs, slots, modules):
        problems.append(
            f"{reach.sized[0]} at sizes written as numbers, which would not follow a narrower tensor: "
            "compute them from the tensor's shape (h.shape[1] // 2) or use chunk"
        )
    reason, residual = _decide(g, reach, problems, slots, prune_skip)
    name = g.root if g.side == "out" else f"{g.root}:in"
    return ChannelGroup(
        name=name or "(model)",
        width=width,
        slots=tuple(slots),
        prunable=not reason,
        residual=residual,
        reason=reason,
        ops=tuple(reach.ops),
        exact=not reach.mixing,
    )


def _slots(
    item: tp_groups.Item, modules: dict[str, nn.Module], reach: Reach, problems: list[str]
) -> list[Slot]:
    if item.index is None:
        problems.append(f"torch-pruning's positions for '{item.name}' do not split evenly over the channels")
        return []
    if item.role == "param":
        st = reach.params.get(item.name)
        if st is not None and (st.dim != item.dim or not _same(item.index, st)):
            problems.append(f"torch-pruning and the op rules place the channels of '{item.name}' differently")
        if item.dim is None or int(item.index.max()) >= _param_size(modules, item.name, item.dim):
            problems.append(f"torch-pruning maps the channels outside '{item.name}'")
            return []
        return [Slot(item.name, item.name.rpartition(".")[0], item.dim, item.index, "param")]
    st = reach.layers.get((item.name, item.role))
    if st is not None and not _same(item.index, st):
        problems.append(f"torch-pruning and the op rules place the channels of '{item.name}' differently")
    m = modules[item.name]
    if item.role == "consumer" and isinstance(m, tp_groups.CONV) and m.groups > 1:
        return []  # grouped conv: its weight's dim 1 is per group; the group is unprunable anyway
    prefix = f"{item.name}." if item.name else ""
    out = []
    for attr, dim, role in _LAYER_TENSORS[item.role]:
        if attr == "weight" and getattr(m, "transposed", False):
            dim = 1 - dim  # ConvTranspose weights are (in, out/groups, ...); such groups stay unprunable
        owner_attr, _, local = attr.rpartition(".")
        owner = m.get_submodule(owner_attr) if owner_attr else m
        t = getattr(owner, local, None)
        if not isinstance(t, torch.Tensor) or t.dim() <= dim:
            continue
        if int(item.index.max()) >= t.shape[dim]:
            problems.append(f"torch-pruning maps the channels outside '{prefix + attr}'")
            continue
        owner_name = f"{prefix}{owner_attr}" if owner_attr else item.name
        out.append(Slot(prefix + attr, owner_name, dim, item.index, role))
    return out


def _grouped_units(
    g: tp_groups.TPGroup,
    slots: list[Slot],
    modules: dict[str, nn.Module],
    reach: Reach,
    problems: list[str],
) -> tuple[list[Slot], int]:
    """Regroup channels that a grouped conv reads or writes into units it can lose.

    A conv with ``G`` groups of ``per = C / G`` channels cannot lose one channel, but it can lose the
    same in-group channel ``u`` of every group: channels ``u, u + per, ..., u + (G-1) per`` of its input
    (or output) together. Each slot's index becomes ``[per, G * k]`` (unit ``u`` -> the positions of those
    ``G`` channels), and the grouped conv's weight gets a consumer slot along its per-group input dim
    (size ``per``). Returns the new slots and width (units), or the old ones with a problem recorded.
    """
    groups = set(reach.grouped.values())
    if len(groups) != 1:
        problems.append(f"grouped convs {sorted(reach.grouped)} split these channels into different groups")
        return slots, g.width
    n_groups = groups.pop()
    items = {i.name: i for i in g.items if i.name in reach.grouped}
    order = None
    for conv_name, item in items.items():
        conv = modules[conv_name]
        size = conv.in_channels if (conv_name, "consumer") in reach.layers else conv.out_channels
        index = item.index
        if (
            index is None
            or index.shape != (g.width, 1)
            or g.width != size
            or not torch.equal(index[:, 0].sort().values, torch.arange(size))
        ):
            problems.append(f"the channels cover only part of grouped conv '{conv_name}' (groups={n_groups})")
            return slots, g.width
        if order is None:
            order = index[:, 0]
        elif not torch.equal(order, index[:, 0]):
            problems.append(f"grouped convs {sorted(items)} see these channels in different orders")
            return slots, g.width
    assert order is not None
    per = g.width // n_groups
    chan_at = torch.empty_like(order)
    chan_at[order] = torch.arange(order.numel())
    # members[u] = the group's channels that sit at in-group position u of every conv group
    members = chan_at.reshape(n_groups, per).t()
    units = [Slot(s.tensor, s.module, s.dim, s.index[members].reshape(per, -1), s.role) for s in slots]
    for conv_name in items:
        if (conv_name, "consumer") in reach.layers:
            prefix = f"{conv_name}." if conv_name else ""
            index = torch.arange(per).reshape(per, 1)
            units.append(Slot(prefix + "weight", conv_name, 1, index, "consumer"))
    return units, per


def _param_size(modules: dict[str, nn.Module], fqn: str, dim: int) -> int:
    """Size of dimension ``dim`` of parameter ``fqn`` (0 if it has no such dim)."""
    owner, _, attr = fqn.rpartition(".")
    t = getattr(modules[owner], attr)
    return t.shape[dim] if -t.dim() <= dim < t.dim() else 0


@torch.no_grad()
def _follows_narrower(
    model: nn.Module, inputs: Any, slots: list[Slot], modules: dict[str, nn.Module]
) -> bool:
    """Whether the forward still runs with the group's first channel removed from every slot: the check
    for splits and slices of the channels whose sizes the code may have written as constants. The
    tensors are swapped in place for the one forward and put back."""
    saved: list[tuple[nn.Module, str, dict[str, Any], Any]] = []
    try:
        for s in slots:
            owner = modules[s.tensor.rpartition(".")[0]]
            attr = s.tensor.rpartition(".")[2]
            table = owner._parameters if attr in owner._parameters else owner._buffers
            t = table[attr]
            keep = torch.ones(t.shape[s.dim], dtype=torch.bool)
            keep[s.index[0]] = False
            narrow = t.detach()[(slice(None),) * s.dim + (keep,)]
            saved.append((owner, attr, table, t))
            table[attr] = nn.Parameter(narrow, requires_grad=False) if table is owner._parameters else narrow
        args, kwargs, _ = prepare_inputs(inputs)
        training = model.training
        model.eval()
        try:
            model(*args, **kwargs)
        finally:
            model.train(training)
        return True
    except Exception as e:  # the shapes no longer fit: what a constant size does
        log.debug("trial forward without one channel failed: %s", e)
        return False
    finally:
        for _owner, attr, table, t in reversed(saved):
            table[attr] = t


def _same(index: torch.Tensor, st: ChanState) -> bool:
    expect = st.positions()
    return index.shape == expect.shape and torch.equal(index, expect)


def _decide(
    g: tp_groups.TPGroup, reach: Reach, problems: list[str], slots: list[Slot], prune_skip: bool
) -> tuple[str, bool]:
    """(reason the group is kept, or "" if prunable; residual flag)."""
    residual = bool(reach.residual)
    if reach.from_input:
        return "channels come from the model input", residual
    if reach.to_output or g.output:
        where = reach.to_output[0] if reach.to_output else "an output"
        return f"channels reach the model output ({where})", residual
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return problems[0] + more, residual
    if not any(s.role == "producer" for s in slots):
        return "no conv/linear layer produces these channels", residual
    if residual and not prune_skip:
        return RESIDUAL_REASON, residual
    if reach.mixing and not prune_skip:
        return f"{reach.mixing[0]}; pass prune_skip=True", residual
    return "", residual


def _check_disjoint(groups: list[ChannelGroup]) -> None:
    """A position of a tensor belongs to at most one group; overlapping groups are made unprunable."""
    owner: dict[tuple[str, int, int], int] = {}
    for gi, g in enumerate(groups):
        for s in g.slots:
            for pos in s.index.flatten().tolist():
                other: Optional[int] = owner.setdefault((s.tensor, s.dim, pos), gi)
                if other != gi:
                    for k in (gi, other):
                        if groups[k].prunable:
                            groups[k].prunable = False
                            groups[k].reason = f"shares '{s.tensor}' [dim {s.dim}] with another group"
