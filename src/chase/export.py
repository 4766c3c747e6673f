"""Reload an exported slim model into a freshly built model of the user's class."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from chase.sparse.targets import unwrap_model
from chase.surgery import replay

SLIM_FORMAT_VERSION = 1


def load_slim(model: nn.Module, checkpoint: Mapping[str, Any]) -> nn.Module:
    """Reshape ``model`` (freshly built, full size) by the recorded removal history, then load the weights.

    ``checkpoint`` is :meth:`chase.Chase.slim_checkpoint` (plain tensors: ``torch.load(weights_only=True)``
    reads it). Returns ``model``, now as narrow as the exported one and with its weights.
    """
    version = checkpoint.get("format_version")
    if version != SLIM_FORMAT_VERSION:
        raise ValueError(f"unsupported slim checkpoint format {version!r} (expected {SLIM_FORMAT_VERSION})")
    module = unwrap_model(model)
    replay(module, checkpoint["history"])
    module.load_state_dict(checkpoint["model"])
    return model
