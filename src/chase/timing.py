"""The one timer: wall-clock times of calls, CUDA-synchronised, for every benchmark and report."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Optional, TypeVar

import torch
from torch import nn

__all__ = ["alternate", "sync", "time_calls", "time_forward"]

K = TypeVar("K", bound=Hashable)


def sync(device: Optional[torch.device | str] = None) -> None:
    """Wait for queued CUDA kernels (of ``device``; of the current device when None and CUDA is in use)."""
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    elif torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 10, device: Optional[torch.device | str] = None
) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones, synchronised before and
    after each call (so a time covers the kernels, not only their launch)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def alternate(
    fns: Mapping[K, Callable[[], Any]],
    *,
    warmup: int = 2,
    repeats: int = 10,
    device: Optional[torch.device | str] = None,
) -> dict[K, list[float]]:
    """Times of several calls measured alternately (``warmup`` untimed rounds first): a slow drift of the
    machine then affects all of them alike, which keeps their ratios honest."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[K, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k] += time_calls(fn, warmup=0, repeats=1, device=device)
    return times


@torch.inference_mode()
def time_forward(
    model: nn.Module | Callable[[torch.Tensor], Any], x: torch.Tensor, *, warmup: int = 3, repeats: int = 10
) -> list[float]:
    """Seconds of each of ``repeats`` forwards of ``x`` after ``warmup`` untimed ones (inference mode).
    ``model`` is a module or any function of ``x`` (e.g. an onnxruntime session's run)."""
    return time_calls(lambda: model(x), warmup=warmup, repeats=repeats, device=x.device)
