"""The exported-model file ("slim checkpoint"): its one writer, reader, version and validation.

Every sparsifier exports to the same format. Keys:

- ``format_version``: :data:`SLIM_FORMAT_VERSION`.
- ``model``: the exported model's ``state_dict`` (removed channels sliced out, masked weights 0).
- ``history``: the channel-removal record that reshapes a freshly built model to fit ``model``
  (:meth:`chase.surgery.SurgeryState.state_dict`); empty when no channel was removed.
- ``masks``: kept-weight masks of the sparse layers, shaped like the exported weights (absent when the
  masks are not of the exported shapes, e.g. Chase's ``removal="mask"``).
- ``meta``: free-form plain values (the trainer stores model name, classes, image size, method).

Plain tensors, numbers and strings only: ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import nn

from chase.graph import unwrap_model
from chase.io import atomic_save, load_tensors
from chase.surgery import replay

__all__ = [
    "SLIM_FORMAT_VERSION",
    "cpu_state_dict",
    "load_slim",
    "make_slim",
    "read_slim",
    "save_slim",
    "validate_slim",
]

SLIM_FORMAT_VERSION = 1


def make_slim(
    model: nn.Module,
    *,
    history: Optional[Mapping[str, Any]] = None,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    meta: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """The slim checkpoint of an exported ``model`` (its weights copied to the CPU)."""
    ckpt: dict[str, Any] = {
        "format_version": SLIM_FORMAT_VERSION,
        "history": dict(history) if history else {},
        "model": cpu_state_dict(model),
    }
    if masks is not None:
        ckpt["masks"] = {n: m.detach().cpu().clone() for n, m in masks.items()}
    if meta is not None:
        ckpt["meta"] = dict(meta)
    return ckpt


def cpu_state_dict(model: nn.Module) -> dict[str, Any]:
    """A copy of ``model``'s ``state_dict`` on the CPU, with its ``_metadata`` (module versions, which
    some modules' loaders read)."""
    state = unwrap_model(model).state_dict()
    with torch.no_grad():
        for k, v in state.items():
            state[k] = v.detach().cpu().clone()
    return state


def validate_slim(checkpoint: Any, where: str = "the checkpoint") -> None:
    """Raise ``ValueError`` saying what is wrong when ``checkpoint`` is not a slim checkpoint."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{where} is not a slim checkpoint (a {type(checkpoint).__name__}, not a mapping)")
    if "optimizer" in checkpoint and "config" in checkpoint:
        raise ValueError(
            f"{where} is a training checkpoint, not an exported model: write one with `chase export` "
            "(or Sparsifier.slim_checkpoint())"
        )
    version = checkpoint.get("format_version")
    if version != SLIM_FORMAT_VERSION:
        raise ValueError(
            f"{where}: unsupported slim checkpoint format {version!r} (expected {SLIM_FORMAT_VERSION})"
        )
    if not isinstance(checkpoint.get("model"), Mapping):
        raise ValueError(f"{where} has no 'model' state_dict: not a slim checkpoint")
    history = checkpoint.get("history") or {}
    if history and not isinstance(history, Mapping):
        raise ValueError(f"{where}: 'history' must be a mapping (a channel-removal record)")


def save_slim(checkpoint: Mapping[str, Any], path: Union[str, os.PathLike]) -> None:
    """Write a slim checkpoint atomically (validated first: nothing half-written, nothing invalid)."""
    validate_slim(checkpoint)
    atomic_save(dict(checkpoint), path)


def read_slim(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """Read and validate a slim checkpoint file (tensors only, on the CPU)."""
    checkpoint = load_tensors(path, "a slim checkpoint")
    validate_slim(checkpoint, str(path))
    return checkpoint


def load_slim(model: nn.Module, checkpoint: Union[Mapping[str, Any], str, os.PathLike]) -> nn.Module:
    """Reshape ``model`` (freshly built, full size) by the recorded removal history, then load the weights.

    ``checkpoint`` is a slim checkpoint (:meth:`chase.Sparsifier.slim_checkpoint`, a file ``chase train`` or
    ``chase export`` wrote, or its path). Works for every method: without removed channels the history is
    empty and only the weights load. Returns ``model``, now as narrow as the exported one.
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_slim(checkpoint)
    else:
        validate_slim(checkpoint)
    module = unwrap_model(model)
    history = checkpoint.get("history") or {}
    if history:
        replay(module, history)
    module.load_state_dict(checkpoint["model"])
    return model
