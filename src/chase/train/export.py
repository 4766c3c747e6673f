"""A training checkpoint rebuilt without the data: its model and sparsifier, and the exported model file."""

from __future__ import annotations

import logging
import os
import pathlib
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from chase.io import atomic_write
from chase.models import get_model
from chase.slim import make_slim, save_slim
from chase.sparsifier import Sparsifier
from chase.train.checkpoint import load_checkpoint
from chase.train.config import TrainConfig
from chase.train.loop import build_sparsifier
from chase.train.optim import build_optimizer

__all__ = ["LoadedRun", "export_checkpoint", "load_run", "rebuild"]


def rebuild(path: str | os.PathLike) -> tuple[TrainConfig, dict[str, Any], nn.Module, Sparsifier | None]:
    """Config, meta, model and sparsifier of a training checkpoint, rebuilt from its config and loaded
    (the sparsifier first, so a Chase model is narrowed before its weights load)."""
    ckpt = load_checkpoint(path)
    cfg = TrainConfig(**ckpt["config"])
    meta = dict(ckpt["meta"])
    model = get_model(cfg.model, num_classes=meta["num_classes"])
    optimizer = build_optimizer(model, cfg)
    quiet = logging.getLogger("chase")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the construction's log (initial density...) describes step 0, not this
    try:
        with warnings.catch_warnings():  # schedule warnings were shown when the run was trained
            warnings.simplefilter("ignore")
            sp = build_sparsifier(model, optimizer, cfg, meta["steps_per_epoch"], meta["image_size"])
    finally:
        quiet.setLevel(level)
    if sp is not None:
        sp.load_state_dict(ckpt["sparsifier"])
    model.load_state_dict(ckpt["model"])
    return cfg, meta, model, sp


@dataclass
class LoadedRun:
    """A training checkpoint rebuilt: ``model`` is the trained model (already narrowed when Chase removed
    channels physically), ``sparsifier`` None for dense runs."""

    path: pathlib.Path
    model_name: str
    method: str
    num_classes: int
    image_size: int
    model: nn.Module
    sparsifier: Optional[Sparsifier]

    @property
    def folder(self) -> pathlib.Path:
        return self.path.parent

    def slim(self) -> Optional[nn.Module]:
        """The exported slim model when the method removed channels, else None (every channel is kept)."""
        sp = self.sparsifier
        return sp.export().eval() if sp is not None and sp.removes_channels else None


def load_run(path: str | os.PathLike) -> LoadedRun:
    """Rebuild model and sparsifier of a run folder or its ``checkpoint.pt``, in eval mode.

    Raises:
        ValueError: ``path`` is neither a run folder nor a checkpoint.
    """
    p = pathlib.Path(path)
    if p.is_dir():
        p = p / "checkpoint.pt"
    if not p.is_file():
        raise ValueError(f"{p} does not exist (give a run folder or its checkpoint.pt)")
    cfg, meta, model, sp = rebuild(p)
    model.eval()
    return LoadedRun(p, cfg.model, cfg.method, meta["num_classes"], meta["image_size"], model, sp)


#: options that name this machine's paths or resources: left out of a model card's recipe.
LOCAL_OPTIONS = ("data_dir", "out", "name", "init_from", "latency_table", "device", "threads", "num_workers")
#: what ``chase export --format`` writes: a slim checkpoint, a shareable folder, ONNX, a torch.export program.
EXPORT_FORMATS = ("pt", "hf-dir", "onnx", "pt2")


def export_checkpoint(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str = "pt",
    onnx: str | os.PathLike | None = None,
    optimize: bool = False,
) -> dict[str, Any]:
    """Rebuild model and sparsifier from the checkpoint's config, load it, write the exported model.

    ``format``: ``"pt"`` a slim checkpoint (:mod:`chase.slim`; ``chase.load_slim`` reads it, for every
    method); ``"hf-dir"`` a folder with safetensors weights, ``config.json`` and a model card
    (:func:`chase.save_pretrained`; ``chase.from_pretrained`` reads it); ``"onnx"`` an ONNX file checked
    with onnxruntime; ``"pt2"`` a ``torch.export`` program (``torch.export.load``). Returns the meta;
    ONNX exports (``format="onnx"`` or the extra ``onnx`` file) add the onnxruntime check under ``"onnx"``.
    With ``optimize`` (ONNX and ``pt2`` only) the graph exported is the one :func:`chase.deploy.deploy`
    serves eagerly: BatchNorm folded into the convolutions, checked against the model (``"deploy"`` in
    the meta); a slim checkpoint or a folder must reload into the model's own architecture, so they are
    never folded.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    if optimize and format in ("pt", "hf-dir") and onnx is None:
        raise ValueError(
            f"--optimize applies to --format onnx or pt2 (or --onnx): a {format} export reloads into the "
            "model's own architecture, with its BatchNorm layers"
        )
    cfg, meta, model, sp = rebuild(path)
    info = {
        "model": cfg.model,
        "num_classes": meta["num_classes"],
        "image_size": meta["image_size"],
        "method": cfg.method,
    }
    exported = (sp.export() if sp is not None else model).eval()  # what every format holds
    size = meta["image_size"]
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    graph = exported  # what the ONNX and pt2 files hold
    if optimize:
        from chase.deploy import deploy

        served = deploy(exported, example, backend="eager", device="cpu")
        graph = served.fn
        info["deploy"] = {k: served.info[k] for k in ("batchnorm", "max_relative_diff")}
    if format == "pt":
        save_slim(sp.slim_checkpoint(info) if sp is not None else make_slim(model, masks={}, meta=info), out)
    elif format == "hf-dir":
        from chase.pretrained import save_pretrained

        save_pretrained(
            sp if sp is not None else model,
            out,
            model_name=cfg.model,
            model_kwargs={"num_classes": meta["num_classes"]},
            recipe={k: v for k, v in cfg.to_dict().items() if k not in LOCAL_OPTIONS},
        )
    elif format == "pt2":
        # The batch dimension stays dynamic, as in the ONNX export.
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.export.export(graph, (example,), dynamic_shapes=({0: batch},))
        atomic_write(out, lambda f: torch.export.save(program, f))
    else:
        onnx = out
    if onnx is None:
        return info
    from chase.onnx import check_onnx, export_onnx

    export_onnx(graph, example, onnx)
    return {**info, "onnx": check_onnx(onnx, exported, example)}
