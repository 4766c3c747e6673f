"""Training checkpoints: written atomically, plain tensors only, with everything a resume needs.

A checkpoint holds the model, optimizer, LR schedule, GradScaler and sparsifier states, the position in
training (epoch, batch, step), every RNG state (as tensors) and the config. ``torch.load(...,
weights_only=True)`` reads it; nothing is pickled.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from chase.io import atomic_save, load_tensors
from chase.train.loop import TrainState
from chase.train.seeds import rank_seed

__all__ = ["CHECKPOINT_FORMAT_VERSION", "atomic_save", "load_checkpoint", "restore", "save_checkpoint"]

CHECKPOINT_FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states, as tensors and plain numbers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {
            "version": version,
            "words": torch.tensor(words, dtype=torch.int64),
            "gauss": gauss if gauss is None else float(gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["words"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(st: TrainState, path: str | os.PathLike) -> None:
    """Write ``st`` to ``path`` atomically (call on rank 0 only)."""
    sp = st.sparsifier
    atomic_save(
        {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "config": st.cfg.to_dict(),
            "meta": dict(st.meta),
            "epoch": st.epoch,
            "batch": st.batch,
            "step": st.step,
            "sums": st.sums.detach().cpu(),
            "model": st.module.state_dict(),
            "optimizer": st.optimizer.state_dict(),
            "scheduler": st.scheduler.state_dict(),
            "scaler": st.scaler.state_dict() if st.scaler is not None else None,
            "sparsifier": sp.state_dict() if sp is not None else None,
            "rng": rng_state(),
        },
        path,
    )


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint (tensors only; on the CPU) and check its format version."""
    ckpt = load_tensors(path, "a training checkpoint")
    if not isinstance(ckpt, dict) or "config" not in ckpt or "optimizer" not in ckpt:
        raise ValueError(
            f"{path} is not a training checkpoint (an exported model? `chase export` reads checkpoint.pt)"
        )
    if ckpt.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format {ckpt.get('format_version')!r}, expected {CHECKPOINT_FORMAT_VERSION}"
        )
    return ckpt


def restore(st: TrainState, ckpt: dict[str, Any]) -> None:
    """Load ``ckpt`` into freshly built objects. The sparsifier goes first: for Chase it replays the channel
    removals, so the model and optimizer have the checkpoint's shapes when their states are loaded."""
    if (ckpt["sparsifier"] is None) != (st.sparsifier is None):
        raise ValueError("checkpoint and config disagree on whether the run is sparse")
    if st.sparsifier is not None:
        st.sparsifier.load_state_dict(ckpt["sparsifier"])
    st.module.load_state_dict(ckpt["model"])
    st.optimizer.load_state_dict(ckpt["optimizer"])
    st.scheduler.load_state_dict(ckpt["scheduler"])
    if st.scaler is not None and ckpt["scaler"] is not None:
        st.scaler.load_state_dict(ckpt["scaler"])
    st.epoch, st.batch, st.step = int(ckpt["epoch"]), int(ckpt["batch"]), int(ckpt["step"])
    # Rank 0 saved every rank's partial sums added up: it carries them, the others start from 0.
    st.sums = ckpt["sums"].to(st.device) if st.dist.main else torch.zeros_like(ckpt["sums"], device=st.device)
    if st.dist.main:
        set_rng_state(ckpt["rng"])
    else:  # other ranks' streams were not saved: derive a fresh one that still differs per rank
        torch.manual_seed(rank_seed(st.cfg.seed, st.dist.rank, st.step))
    st.wrap()
