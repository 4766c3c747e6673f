"""Physically slice positions out of a model's tensors, in place, and everything shaped like them.

The same ``nn.Parameter`` objects stay in the model (``param.data`` is reassigned), so an optimizer built
before surgery keeps working; its per-parameter state, the gradients and the sparsity masks are sliced with
them. Module shape attributes are recomputed by the rule table in :mod:`chase.surgery.rules`, which is
consulted for every affected module BEFORE any tensor is touched, so an unsupported layer leaves the model
unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from chase.surgery.attention import attention_attributes, attention_modules
from chase.surgery.rules import apply_attributes, new_attributes

logger = logging.getLogger(__name__)

Keep = Mapping[str, Mapping[int, torch.Tensor]]
"""tensor name -> dim -> LongTensor of CURRENT positions to keep (any device; moved as needed)."""


@dataclass
class _Target:
    name: str
    module_name: str
    module: nn.Module
    local: str
    tensor: torch.Tensor
    is_param: bool
    dims: Mapping[int, torch.Tensor]


class _IndexCache:
    """Keep-indices moved to each device once, however many tensors (param, grad, moments) use them."""

    def __init__(self, dims: Mapping[int, torch.Tensor]) -> None:
        self._dims = dims
        self._by_device: dict[torch.device, dict[int, torch.Tensor]] = {}

    def on(self, device: torch.device) -> dict[int, torch.Tensor]:
        if device not in self._by_device:
            self._by_device[device] = {d: k.to(device, torch.long) for d, k in self._dims.items()}
        return self._by_device[device]


def _take(t: torch.Tensor, cache: _IndexCache) -> torch.Tensor:
    """``t`` restricted to the kept positions along every sliced dim (one ``index_select`` per dim)."""
    out = t
    for d, k in cache.on(t.device).items():
        out = out.index_select(d, k)
    # index_select returns a contiguous tensor: keep a channels-last layout the user chose.
    if not t.is_contiguous():
        for fmt, nd in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
            if t.dim() == nd and t.is_contiguous(memory_format=fmt):
                out = out.contiguous(memory_format=fmt)
    return out


def _resolve(model: nn.Module, keep: Keep) -> list[_Target]:
    targets = []
    for name, dims in keep.items():
        if not dims:
            continue
        module_name, _, local = name.rpartition(".")
        module = model.get_submodule(module_name)
        tensor = module._parameters.get(local)
        is_param = tensor is not None
        if tensor is None:
            tensor = module._buffers.get(local)
        if tensor is None:
            raise ValueError(f"{name!r} is neither a parameter nor a buffer of the model")
        targets.append(_Target(name, module_name, module, local, tensor, is_param, dims))
    return targets


def _plan_attributes(model: nn.Module, targets: list[_Target]) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
    """New attributes of every affected module, from its tensors' future shapes (raises, mutates nothing).

    Attention modules above a sliced tensor get theirs from their head layout (their head count lives in
    Python attributes, their projections may be child layers); every other module from the rule table.
    """
    new_shapes: dict[str, dict[str, torch.Size]] = {}
    modules: dict[str, nn.Module] = {}
    planned: dict[str, torch.Size] = {}
    for t in targets:
        shape = list(t.tensor.shape)
        for d, k in t.dims.items():
            shape[d] = k.numel()
        new_shapes.setdefault(t.module_name, {})[t.local] = torch.Size(shape)
        planned[t.name] = torch.Size(shape)
        modules[t.module_name] = t.module
    attention = attention_modules(model, list(planned))

    def shape_of(name: str) -> torch.Size:
        return planned[name] if name in planned else model.get_parameter(name).shape

    plans = {}
    for name, (module, layout) in attention.items():
        try:
            plans[name] = (module, attention_attributes(module, layout, shape_of))
        except ValueError as e:
            raise ValueError(f"cannot remove heads of attention layer {name!r}: {e}") from e
    for module_name, module in modules.items():
        if module_name in plans:
            continue
        shapes = {n: p.shape for n, p in module._parameters.items() if p is not None}
        shapes.update({n: b.shape for n, b in module._buffers.items() if b is not None})
        shapes.update(new_shapes[module_name])
        plans[module_name] = (module, new_attributes(module_name, module, shapes))
    return plans


def _drop_grad_accumulator(param: torch.Tensor) -> None:
    """Make autograd forget the parameter's gradient accumulator before its shape changes.

    Autograd caches one accumulator node per leaf, with the leaf's shape, for as long as anything holds it
    (a DDP reducer, a retained graph, a reference cycle). A later backward through a reshaped parameter
    would then fail with "invalid gradient ... expected shape compatible with <old shape>". Assigning
    ``.data`` of another dtype is the documented condition under which autograd drops that cache, so we
    pass through an empty tensor of another dtype; the real data is assigned right after.
    """
    other = torch.float64 if param.dtype != torch.float64 else torch.float32
    param.data = torch.empty(0, dtype=other, device=param.device)


def check_attributes(model: nn.Module, keep: Keep) -> None:
    """Raise the ValueError :func:`slice_tensors` would raise for ``keep``, changing nothing."""
    _plan_attributes(model, _resolve(model, keep))


def slice_tensors(
    model: nn.Module,
    keep: Keep,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    masks: MutableMapping[str, torch.Tensor] | None = None,
) -> set[str]:
    """Keep only the given positions of the named parameters/buffers; return the names whose shape changed.

    Also slices, for a parameter: its ``.grad``, every tensor in ``optimizer.state[param]`` that has the
    parameter's full shape (momentum, Adam moments, ...; scalars such as ``step`` are left alone), and
    ``masks[name]`` (its ``.data`` is reassigned, so other references to the mask see the change).
    Each tensor is sliced once per dim. Module attributes are then fixed by the rule table.
    """
    targets = _resolve(model, keep)
    attributes = _plan_attributes(model, targets)  # may raise: nothing has been mutated yet
    opt_state = optimizer.state if optimizer is not None else {}
    changed: set[str] = set()
    for t in targets:
        cache = _IndexCache(t.dims)
        old_shape = t.tensor.shape
        if t.is_param:
            # Shape equality is decided before slicing: afterwards the parameter has its new shape.
            state = opt_state.get(t.tensor)  # .get: optimizer.state is a defaultdict, don't grow it
            if state:
                for key, value in list(state.items()):
                    if isinstance(value, torch.Tensor) and value.shape == old_shape:
                        state[key] = _take(value, cache)
            grad = t.tensor.grad
            sliced = _take(t.tensor.data, cache)
            _drop_grad_accumulator(t.tensor)
            t.tensor.data = sliced
            if grad is not None:
                # The grad setter checks the size against the parameter's, hence after ``.data``.
                t.tensor.grad = _take(grad, cache) if grad.shape == old_shape else None
        else:
            t.tensor.data = _take(t.tensor.data, cache)
        if masks is not None and t.name in masks and masks[t.name].shape == old_shape:
            masks[t.name].data = _take(masks[t.name].data, cache)
        changed.add(t.name)
        logger.debug("sliced %s: %s -> %s", t.name, tuple(old_shape), tuple(t.tensor.shape))
    for module, attrs in attributes.values():
        apply_attributes(module, attrs)
    return changed
