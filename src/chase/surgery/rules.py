"""Per-module-type rules that recompute a module's shape attributes from its (new) tensor shapes.

A rule is ``rule(module, shapes) -> {attribute: value}``: ``shapes`` maps the module's own parameter and
buffer names to their shapes after slicing. Rules are pure (they never mutate) and raise ValueError when
the module cannot take the new shapes, so surgery can check every module before it touches any tensor.
The table is keyed by type and matched with ``isinstance``; no model class names appear anywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

Shapes = Mapping[str, torch.Size]
Rule = Callable[[nn.Module, Shapes], "dict[str, Any]"]


def _same_length(shapes: Shapes, names: tuple[str, ...]) -> int | None:
    """The common dim-0 size of the named tensors that exist; ValueError when they disagree."""
    sizes = {n: shapes[n][0] for n in names if n in shapes}
    if not sizes:
        return None
    if len(set(sizes.values())) != 1:
        raise ValueError(f"tensors were sliced inconsistently: {sizes}")
    return next(iter(sizes.values()))


def _conv_rule(module: nn.Module, shapes: Shapes) -> dict[str, Any]:
    w = shapes["weight"]
    groups, c_in, c_out = module.groups, module.in_channels, module.out_channels
    if groups == 1:
        # Plain convs hold [out, in, ...]; transposed convs hold [in, out, ...].
        rows, cols = (w[1], w[0]) if module.transposed else (w[0], w[1])
        new = {"in_channels": cols, "out_channels": rows}
    elif groups == c_in == c_out:
        # Depthwise: every channel is its own group, so a channel takes its filter with it and ``groups``
        # follows the width.
        # [out, in/groups, ...] for convs, [in, out/groups, ...] for transposed ones: dim 1 stays 1.
        n = w[0]
        if w[1] != 1:
            raise ValueError(f"depthwise conv cannot take weight shape {tuple(w)}")
        new = {"in_channels": n, "out_channels": n, "groups": n}
    else:
        # Grouped (a depthwise conv with a channel multiplier too): channels go in units of one in-group
        # position across every group (the graph's grouped units), so ``groups`` stays and both widths
        # stay multiples of it. (A grouped conv shrunk to one channel per group looks depthwise, but then
        # neither of its unit groups can lose another unit.)
        if module.transposed:
            raise ValueError(f"grouped transposed conv (groups={groups}) cannot be sliced")
        if w[0] % groups:
            raise ValueError(f"grouped conv (groups={groups}) cannot take {w[0]} output channels")
        new = {"in_channels": w[1] * groups, "out_channels": w[0]}
    bias = shapes.get("bias")
    if bias is not None and bias[0] != new["out_channels"]:
        raise ValueError(f"bias size {bias[0]} != out_channels {new['out_channels']}")
    return new


def _linear_rule(module: nn.Module, shapes: Shapes) -> dict[str, Any]:
    w = shapes["weight"]
    bias = shapes.get("bias")
    if bias is not None and bias[0] != w[0]:
        raise ValueError(f"bias size {bias[0]} != out_features {w[0]}")
    return {"in_features": w[1], "out_features": w[0]}


_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _batchnorm_rule(module: nn.Module, shapes: Shapes) -> dict[str, Any]:
    n = _same_length(shapes, _NORM_TENSORS)
    return {} if n is None else {"num_features": n}


def _groupnorm_rule(module: nn.Module, shapes: Shapes) -> dict[str, Any]:
    n = _same_length(shapes, ("weight", "bias"))
    if n is None:
        return {}
    if n % module.num_groups:
        raise ValueError(f"{n} channels are not divisible by num_groups={module.num_groups}")
    return {"num_channels": n}


def _normalized_shape_rule(module: nn.Module, shapes: Shapes) -> dict[str, Any]:
    sizes = {tuple(shapes[n]) for n in ("weight", "bias") if n in shapes}
    if not sizes:
        return {}
    if len(sizes) != 1:
        raise ValueError(f"weight and bias were sliced inconsistently: {sizes}")
    return {"normalized_shape": next(iter(sizes))}


def _prelu_rule(module: nn.Module, shapes: Shapes) -> dict[str, Any]:
    return {"num_parameters": shapes["weight"][0]}


def _embedding_rule(module: nn.Module, shapes: Shapes) -> dict[str, Any]:
    w = shapes["weight"]
    return {"num_embeddings": w[0], "embedding_dim": w[1]}


_BATCHNORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

# Order matters only between a type and its subclasses; user rules are inserted first so they win.
_RULES: list[tuple[type, Rule]] = [
    (
        (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
        _conv_rule,
    ),
    (nn.Linear, _linear_rule),
    (_BATCHNORM_TYPES, _batchnorm_rule),
    (nn.GroupNorm, _groupnorm_rule),
    (nn.LayerNorm, _normalized_shape_rule),
    (nn.PReLU, _prelu_rule),
    (nn.Embedding, _embedding_rule),
]
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    _RULES.append((nn.RMSNorm, _normalized_shape_rule))


def register_rule(module_type: type | tuple[type, ...], rule: Rule) -> None:
    """Teach surgery how to fix the attributes of ``module_type`` (e.g. a no-op for a layer-scale module).

    A registered rule takes precedence over the built-in ones.
    """
    _RULES.insert(0, (module_type, rule))


def find_rule(module: nn.Module) -> Rule | None:
    """The rule for ``module``'s type, or None when there is none."""
    for types, rule in _RULES:
        if isinstance(module, types):
            return rule
    return None


#: int attributes of an unknown module that, holding a changed size, name that size (they follow it).
SIZE_NAMES = frozenset(
    [
        "dim",
        "channels",
        "num_channels",
        "num_features",
        "features",
        "in_features",
        "out_features",
        "in_channels",
        "out_channels",
        "hidden_dim",
        "hidden_size",
        "head_hidden_size",
        "embed_dim",
        "width",
        "planes",
        "chs",
        "in_chs",
        "out_chs",
    ]
)


def new_attributes(name: str, module: nn.Module, shapes: Shapes) -> dict[str, Any]:
    """Attributes ``module`` (called ``name``) takes after slicing; ValueError naming the layer if none fit.

    A module type without a rule keeps its attributes, except those that visibly record a size that the
    slicing changes: an int attribute with a size name (``dim``, ``channels``, ``num_features``, ...) and a
    broadcast shape (a tuple like timm's layer scale ``(dim, 1, 1)``) follow the new size. Any other
    attribute holding a changed size (an int or tuple whose meaning is unknown) is an error naming it:
    :func:`register_rule` teaches surgery that type. A module that only owns a per-channel parameter
    (ConvNeXt's layer scale) needs nothing.
    """
    rule = find_rule(module)
    if rule is None:
        follow, unknown = _size_attributes(module, shapes)
        if unknown:
            raise ValueError(
                f"cannot slice channels of layer {name!r} ({type(module).__qualname__}): no surgery rule for "
                f"its type, and its attribute(s) {', '.join(unknown)} hold a size that would change; "
                "chase.surgery.register_rule() can teach it"
            )
        if follow:
            logger.debug(
                "%s (%s): attributes %s follow the new size", name, type(module).__qualname__, follow
            )
        return follow
    try:
        return rule(module, shapes)
    except ValueError as e:
        raise ValueError(f"cannot slice channels of layer {name!r} ({type(module).__name__}): {e}") from e


def _size_attributes(module: nn.Module, shapes: Shapes) -> tuple[dict[str, Any], list[str]]:
    """For a module without a rule: (attributes that follow the new size, attributes of unknown meaning
    that hold a changed size)."""
    changed: dict[int, set[int]] = {}
    for tensor_name, new in shapes.items():
        old = getattr(module, tensor_name, None)
        if isinstance(old, torch.Tensor) and tuple(old.shape) != tuple(new):
            for a, b in zip(old.shape, new):
                if a != b:
                    changed.setdefault(a, set()).add(b)
    follow: dict[str, Any] = {}
    unknown = []
    for attr, value in vars(module).items():
        if attr.startswith("_") or isinstance(value, bool):
            continue
        if isinstance(value, int) and value in changed:
            if attr in SIZE_NAMES and len(changed[value]) == 1:
                follow[attr] = next(iter(changed[value]))
            else:
                unknown.append(attr)
        elif isinstance(value, (tuple, list)) and any(
            isinstance(v, int) and not isinstance(v, bool) and v in changed for v in value
        ):
            hits = [i for i, v in enumerate(value) if v in changed]
            broadcast = len(hits) == 1 and all(v == 1 for i, v in enumerate(value) if i != hits[0])
            if broadcast and len(changed[value[hits[0]]]) == 1:
                new_value = list(value)
                new_value[hits[0]] = next(iter(changed[value[hits[0]]]))
                follow[attr] = type(value)(new_value)
            else:
                unknown.append(attr)
    return follow, unknown


def apply_attributes(module: nn.Module, attrs: Mapping[str, Any]) -> None:
    """Set the attributes computed by :func:`new_attributes` (plain ints/tuples, never tensors)."""
    for attr, value in attrs.items():
        setattr(module, attr, value)
