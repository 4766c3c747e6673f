"""Files the library writes and reads: atomic writes, and loads that never unpickle code."""

from __future__ import annotations

import os
import pathlib
import pickle
from typing import Any

import torch

__all__ = ["atomic_save", "load_tensors"]


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: a crash mid-write leaves
    the previous file intact."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_tensors(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file that is missing, empty or not a torch file
    of plain tensors raises ``ValueError`` naming ``what`` was expected (never advice to unpickle it)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist (expected {what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in first:  # torch's message goes on to suggest weights_only=False
            first = "it holds objects other than tensors and plain containers"
        raise ValueError(f"{path} is not {what} ({first[:200]})") from None
