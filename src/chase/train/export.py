"""Turn a training checkpoint into a slim model file, without the data."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from chase.models import get_model
from chase.sparsifier import Sparsifier
from chase.train.checkpoint import atomic_save, load_checkpoint
from chase.train.config import TrainConfig
from chase.train.loop import build_sparsifier
from chase.train.optim import build_optimizer

__all__ = ["export_checkpoint", "rebuild"]


def rebuild(path: str | os.PathLike) -> tuple[TrainConfig, dict[str, Any], nn.Module, Sparsifier | None]:
    """Config, meta, model and sparsifier of a training checkpoint, rebuilt from its config and loaded
    (the sparsifier first, so a Chase model is narrowed before its weights load)."""
    ckpt = load_checkpoint(path)
    cfg = TrainConfig(**ckpt["config"])
    meta = dict(ckpt["meta"])
    model = get_model(cfg.model, num_classes=meta["num_classes"])
    optimizer = build_optimizer(model, cfg)
    with warnings.catch_warnings():  # schedule warnings were shown when the run was trained
        warnings.simplefilter("ignore")
        sp = build_sparsifier(model, optimizer, cfg, meta["steps_per_epoch"], meta["image_size"])
    if sp is not None:
        sp.load_state_dict(ckpt["sparsifier"])
    model.load_state_dict(ckpt["model"])
    return cfg, meta, model, sp


def export_checkpoint(
    path: str | os.PathLike, out: str | os.PathLike, *, onnx: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Rebuild model and sparsifier from the checkpoint's config, load it, write the exported model.

    Chase: the slim checkpoint (``chase.load_slim(get_model(meta["model"], ...), torch.load(out))``);
    other methods: the masked weights. Returns the file's ``meta``; with ``onnx``, the same model is also
    written to that ONNX file and checked with onnxruntime (:func:`chase.onnx.check_onnx`), whose result
    is returned under ``"onnx"``.
    """
    cfg, meta, model, sp = rebuild(path)
    info = {
        "model": cfg.model,
        "num_classes": meta["num_classes"],
        "image_size": meta["image_size"],
        "method": cfg.method,
    }
    if hasattr(sp, "slim_checkpoint"):
        slim = sp.slim_checkpoint()
        slim["meta"] = info
        atomic_save(slim, out)
    else:
        with torch.no_grad():
            state = {k: v.clone() for k, v in model.state_dict().items()}
        atomic_save(
            {"format_version": 1, "meta": info, "model": state, "masks": sp.masks if sp is not None else {}},
            out,
        )
    if onnx is None:
        return info
    from chase.onnx import check_onnx, export_onnx

    # The model chase.load_slim would rebuild from `out`: the slim one for Chase, else the masked one.
    exported = (sp.export() if hasattr(sp, "export") else model).eval()
    size = meta["image_size"]
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    export_onnx(exported, example, onnx)
    return {**info, "onnx": check_onnx(onnx, exported, example)}
