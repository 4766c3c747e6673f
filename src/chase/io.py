"""Files the library writes and reads: atomic writes, and loads that never unpickle code."""

from __future__ import annotations

import errno
import os
import pathlib
import pickle
import zipfile
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["atomic_save", "atomic_write_bytes", "atomic_write_text", "load_tensors", "stale_temporaries"]


#: prefix and infix of the temporary files of atomic writes: ``.<name>.tmp<pid>``.
TMP_INFIX = ".tmp"


def _atomic(path: str | os.PathLike, write: Callable[[Any], None], mode: str) -> None:
    """Write through ``write(file)`` into a temporary file in the same folder, then ``os.replace``: a crash
    or a full disk mid-write leaves the previous file intact and no temporary file behind."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if _disk_full(e):
            raise OSError(errno.ENOSPC, f"no space left on the device while writing {path}") from e
        if isinstance(e, (PermissionError, RuntimeError)):  # name the file, not the temporary
            reason = "permission denied" if isinstance(e, PermissionError) else str(e).splitlines()[0][:200]
            raise OSError(getattr(e, "errno", None) or errno.EIO, f"cannot write {path}: {reason}") from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def _disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a full disk; torch's writer reports one as a failed "enforce"
    about an unexpected file position."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, RuntimeError) and "unexpected pos" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Write a binary file through ``write(file)`` atomically (see :func:`_atomic`): a failure leaves the
    previous file intact and raises ``OSError`` naming ``path``."""
    _atomic(path, write, "wb")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically (see :func:`_atomic`); a full disk raises ``OSError(ENOSPC)`` naming
    the file."""
    _atomic(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (see :func:`_atomic`)."""
    _atomic(path, lambda f: f.write(text), "w")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a binary file atomically (see :func:`_atomic`)."""
    _atomic(path, lambda f: f.write(data), "wb")


def stale_temporaries(folder: str | os.PathLike) -> list[pathlib.Path]:
    """Temporary files that atomic writes of a killed process left in ``folder``."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.name.startswith(".") and TMP_INFIX in p.name and p.is_file()]


def load_tensors(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file that is missing, empty or not a torch file
    of plain tensors raises ``ValueError`` naming ``what`` was expected (never advice to unpickle it)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist (expected {what})")
    truncated = f"{path} is truncated or damaged: not a complete {what} (an interrupted write or copy?)"
    with open(path, "rb") as f:
        zipped = f.read(2) == b"PK"
    if zipped and not zipfile.is_zipfile(path):  # torch's files are zip archives: their index is at the end
        raise ValueError(truncated)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # whatever the unpickler trips over in a file that is not a torch file
        if isinstance(e, OSError) and getattr(e, "errno", None) == errno.EINVAL:
            raise ValueError(truncated) from None  # a zip whose entries end early
        if isinstance(e, OSError) and not isinstance(e, pickle.UnpicklingError):
            raise  # unreadable (permissions, I/O): the OS's own message says it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in first:  # torch's message goes on to suggest weights_only=False
            first = "it holds objects other than tensors and plain containers"
        elif not any(c.isalpha() for c in first):  # the unpickler's KeyError(105) on a text file, say
            first = "not a file torch.save wrote" if not zipped else f"{type(e).__name__}: {first}"
        raise ValueError(f"{path} is not {what} ({first[:200]})") from None
