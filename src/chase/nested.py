"""Nested values (a module's inputs or outputs: tensors in tuples, lists and dicts): one walk for every
unit that needs it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["like", "map_tensors", "tensors", "zeros_like"]


def tensors(obj: Any) -> list[torch.Tensor]:
    """All tensors in nested tuples, lists and dicts (and their values), in order; other leaves are
    skipped."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in tensors(x)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in tensors(x)]
    return []


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it (same nesting; other leaves unchanged)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def like(obj: Any, ref: torch.Tensor) -> Any:
    """``obj`` with its tensors on ``ref``'s device, floating ones in ``ref``'s dtype (so an example input
    made on the CPU in fp32 works for a model on CUDA or in fp64)."""
    return map_tensors(obj, lambda t: t.to(ref.device, ref.dtype if t.is_floating_point() else t.dtype))


def zeros_like(obj: Any) -> Any:
    """``obj`` with every tensor replaced by zeros of batch size 1 (same dtype, device, other dims)."""
    return map_tensors(
        obj, lambda t: torch.zeros((1, *t.shape[1:]) if t.ndim else (), dtype=t.dtype, device=t.device)
    )
