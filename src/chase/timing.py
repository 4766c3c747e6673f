"""The one timer: wall-clock times of calls, CUDA-synchronised, for every benchmark and report."""

from __future__ import annotations

import functools
import statistics
import time
import weakref
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Optional, TypeVar

import torch
from torch import nn

from chase.nested import tensors

__all__ = ["CallKey", "alternate", "module_self_times", "sync", "time_calls", "time_forward"]

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


#: one call of one module in a forward: (module name, how many calls of it came before).
CallKey = tuple[str, int]


def _shapes(obj: Any) -> tuple:
    """The shapes and dtypes of the tensors in a nested input or output."""
    return tuple((tuple(t.shape), t.dtype) for t in tensors(obj))


def _refs(ts: list[torch.Tensor]) -> dict[int, weakref.ref]:
    return {id(t): weakref.ref(t) for t in ts}


def _is_known(known: Mapping[int, weakref.ref], t: torch.Tensor) -> bool:
    # By id and the object itself: a freed tensor's id is soon another tensor's.
    ref = known.get(id(t))
    return ref is not None and ref() is t


class _SelfTimer:
    """Hooks on every module of a model that record, per call, its self time (the call's wall time minus
    that of the module calls inside it: what its own code, e.g. a residual addition or an attention
    product, costs) and a signature of the work that code did: the shapes of its inputs, outputs and own
    parameters, and of the tensors its own code made and handed to a submodule (an attention product fed
    to the output projection). Two calls with the same signature did the same work."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.device = device
        self.times: dict[CallKey, float] = {}
        self.signatures: dict[CallKey, int] = {}
        self._calls: dict[str, int] = {}
        # One frame per open call: key, start, time of the calls inside it, the tensors it did not make
        # itself (its inputs, its submodules' outputs; weakly, by id), the shapes of those it made.
        self._stack: list[list[Any]] = []
        self._handles = []
        for name, module in model.named_modules():
            # with_kwargs: transformers models pass hidden states to their layers as keywords.
            enter, leave = functools.partial(self._enter, name), functools.partial(self._leave, name)
            self._handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
            self._handles.append(module.register_forward_hook(leave, with_kwargs=True))

    def _enter(self, name: str, module: nn.Module, args: Any, kwargs: Any) -> None:
        index = self._calls.get(name, 0)
        self._calls[name] = index + 1
        inputs = tensors((args, kwargs))
        if self._stack:  # inputs the caller's own code made are part of the caller's work
            known, made = self._stack[-1][3], self._stack[-1][4]
            made += [(tuple(t.shape), t.dtype) for t in inputs if not _is_known(known, t)]
        sync(self.device)
        self._stack.append([(name, index), time.perf_counter(), 0.0, _refs(inputs), []])

    def _leave(self, name: str, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        sync(self.device)
        elapsed = time.perf_counter()
        key, start, inner, _, made = self._stack.pop()
        elapsed -= start
        params = tuple(tuple(p.shape) for p in module.parameters(recurse=False))
        self.times[key] = elapsed - inner
        self.signatures[key] = hash((_shapes((args, kwargs)), _shapes(output), params, tuple(made)))
        if self._stack:
            self._stack[-1][2] += elapsed
            self._stack[-1][3].update(_refs(tensors(output)))

    def reset(self) -> None:
        self._calls.clear()
        self._stack.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def module_self_times(
    model: nn.Module, x: torch.Tensor, warmup: int, repeats: int
) -> dict[CallKey, tuple[int, float]]:
    """Per module call of ``model(x)`` (key: module name, index of the call): a signature of the work its
    own code did (the shapes of its inputs, outputs and own parameters, and of the tensors it made and
    handed to a submodule) and its median self time in seconds (its wall time minus that of the module
    calls inside it) over ``repeats`` forwards after ``warmup``. Two calls with the same signature did
    the same work."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
    timer = _SelfTimer(model, x.device)
    runs: dict[CallKey, list[float]] = {}
    try:
        for _ in range(max(1, repeats)):
            timer.reset()
            with torch.inference_mode():
                model(x)
            for key, t in timer.times.items():
                runs.setdefault(key, []).append(t)
    finally:
        timer.remove()
    return {k: (timer.signatures[k], statistics.median(v)) for k, v in runs.items()}
