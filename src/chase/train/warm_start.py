"""Start a run from trained weights (``init_from``): a run folder, a checkpoint, an exported model or a
plain ``state_dict`` file, read as tensors only."""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from chase.io import load_tensors
from chase.train.config import ConfigError

log = logging.getLogger(__name__)

__all__ = ["load_initial_weights"]


def _state_dict(obj: Any, path: pathlib.Path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "optimizer" in obj and "config" in obj:  # a training checkpoint
        sparsifier = obj.get("sparsifier") or {}
        if sparsifier.get("surgery"):
            raise ConfigError(
                f"{path} is a Chase run with removed channels: start from a dense run's weights"
            )
        return obj["model"]
    if isinstance(obj, Mapping) and "format_version" in obj and "model" in obj:  # an exported model
        if obj.get("history"):
            raise ConfigError(f"{path} is a narrowed (slim) model: start from a dense model's weights")
        return obj["model"]
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ConfigError(
        f"{path} holds no state_dict (a run folder, checkpoint.pt, final.pt or a state_dict file)"
    )


def load_initial_weights(module: nn.Module, source: str | os.PathLike) -> None:
    """Load the weights of ``source`` into ``module`` (same architecture, every key, same shapes)."""
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        path = path / "checkpoint.pt"
    try:
        obj = load_tensors(path, "a checkpoint, an exported model or a state_dict")
    except ValueError as e:
        raise ConfigError(f"init_from: {e}") from None
    state = _state_dict(obj, path)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ConfigError(f"init_from {path} does not fit the model: {' '.join(first[:3])[:400]}") from None
    log.info("initial weights loaded from %s", path)
