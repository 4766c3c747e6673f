"""The tensors inside a nested value (a module's inputs or outputs): one walk for every unit that needs it."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["tensors"]


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
