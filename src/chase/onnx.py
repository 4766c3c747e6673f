"""ONNX export of a (slim) model, checked against PyTorch with onnxruntime, and its CPU throughput.

A slim model from :meth:`chase.Chase.export` is an ordinary narrower ``nn.Module``, so any ONNX runtime
runs it without sparse kernels. ``onnx``, ``onnxscript`` and ``onnxruntime`` are optional
(``pip install "chase-dst[onnx]"``) and imported only inside these functions: ``import chase`` never
loads them.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import pathlib
import shutil
import statistics
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from chase.timing import time_forward

log = logging.getLogger(__name__)

__all__ = ["OnnxCheckError", "check_onnx", "export_onnx", "onnx_runner", "onnx_throughput"]

INSTALL_HINT = 'pip install "chase-dst[onnx]"'
INPUT_NAME = "input"
EXPORTERS = ("auto", "dynamo", "torchscript")


class OnnxCheckError(RuntimeError):
    """onnxruntime's outputs differ from PyTorch's beyond the tolerance (or have other shapes)."""


def _require(name: str, what: str) -> Any:
    """Import an optional dependency or say how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ModuleNotFoundError(f"{what} needs the '{name}' package: {INSTALL_HINT}") from e


def _dynamo_is_default() -> bool:
    """True where ``torch.onnx.export`` defaults to the torch.export-based exporter (torch >= 2.9)."""
    param = inspect.signature(torch.onnx.export).parameters.get("dynamo")
    return param is not None and param.default is True


def _output_names(model: nn.Module, x: torch.Tensor) -> list[str]:
    with torch.inference_mode():
        n = len(_flatten(model(x)))
    return ["output"] if n == 1 else [f"output{i}" for i in range(n)]


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    raise TypeError(f"cannot compare a model output of type {type(out).__name__} with ONNX outputs")


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Raise these loggers to WARNING for the block: onnxscript logs every graph pass at INFO, which
    would flood a CLI that shows the package's own INFO lines."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_dynamo(
    model: nn.Module, x: torch.Tensor, target: pathlib.Path, opset: Optional[int], dyn: bool
) -> None:
    _require("onnxscript", "the torch.export-based ONNX exporter")
    with _quiet_loggers("onnxscript", "onnx_ir", "torch.onnx"):
        torch.onnx.export(
            model,
            (x,),
            str(target),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=_output_names(model, x),
            opset_version=opset,
            # By position, so the forward argument's name does not matter. A named Dim makes torch.export
            # fail loudly when the model fixes its batch size (e.g. a reshape to a constant batch) instead of
            # silently exporting a static axis.
            dynamic_shapes=({0: torch.export.Dim("batch")},) if dyn else None,
            # One self-contained file (weights inline); models over 2 GB still get a .data file beside it.
            external_data=False,
            verbose=False,
        )


def _export_torchscript(
    model: nn.Module, x: torch.Tensor, target: pathlib.Path, opset: Optional[int], dyn: bool
) -> None:
    outputs = _output_names(model, x)
    kwargs: dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # torch < 2.5 has no such argument: the TorchScript exporter is all it has
    with warnings.catch_warnings():  # chosen deliberately (see export_onnx); its deprecation is known
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            model,
            (x,),
            str(target),
            input_names=[INPUT_NAME],
            output_names=outputs,
            opset_version=opset,
            dynamic_axes={n: {0: "batch"} for n in [INPUT_NAME, *outputs]} if dyn else None,
            **kwargs,
        )


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: Optional[int] = None,
    dynamic_batch: bool = True,
    exporter: str = "auto",
) -> pathlib.Path:
    """Write ``model`` (evaluated in eval mode) to the ONNX file ``path``; returns the path.

    ``example_inputs`` is one input tensor (N, ...). With ``dynamic_batch`` the batch axis of the input and
    of every output is symbolic, so one file serves every batch size. ``opset`` None takes the exporter's
    default. The model is not changed: its training flag is restored afterwards. The file is written
    atomically: a failed export leaves no file (and an existing one untouched).

    ``exporter``: ``"dynamo"`` (``torch.export``-based, needs ``onnxscript``), ``"torchscript"`` (the legacy
    tracer) or ``"auto"``: the one ``torch.onnx.export`` itself defaults to (dynamo from torch 2.9 on,
    so torch 2.11 and 2.14 both use it; TorchScript before), falling back to TorchScript, with a
    warning, when the dynamo exporter cannot capture the model. Why this order: from torch 2.9 the
    TorchScript exporter is deprecated and warns that it will be removed, so a default built on it would
    break with some future torch; the dynamo exporter is the maintained path. The fallback keeps models
    that ``torch.export`` cannot trace (data-dependent Python control flow) exportable while torch still
    ships the tracer; :func:`check_onnx` then shows whether the traced file is right at two batch sizes.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if not isinstance(example_inputs, torch.Tensor):
        raise TypeError("export_onnx takes one input tensor (models with several inputs are not supported)")
    _require("onnx", "ONNX export")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = example_inputs.detach()
    if dynamic_batch and x.shape[0] < 2:
        # torch.export specialises a size-1 dimension to the constant 1; a batch of 2 keeps it symbolic.
        x = x[:1].expand(2, *x.shape[1:]).contiguous()
    use = exporter
    if use == "auto":
        use = "dynamo" if _dynamo_is_default() else "torchscript"
    was_training = model.training
    model.eval()
    # Export into a private folder beside the target, then move: os.replace within one file system is
    # atomic, and an exporter that writes a weights file next to the model (.data) writes it there too.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        target = tmp / path.name
        try:
            if use == "dynamo":
                _export_dynamo(model, x, target, opset, dynamic_batch)
            else:
                _export_torchscript(model, x, target, opset, dynamic_batch)
        except ModuleNotFoundError:
            raise
        except Exception as e:
            if exporter != "auto" or use != "dynamo":
                raise
            warnings.warn(
                f"the torch.export-based ONNX exporter failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}); using the TorchScript exporter",
                RuntimeWarning,
                stacklevel=2,
            )
            use = "torchscript"
            for f in tmp.iterdir():
                f.unlink()
            _export_torchscript(model, x, target, opset, dynamic_batch)
        if not target.is_file():
            raise RuntimeError(f"the ONNX exporter wrote no {target.name}")
        with open(target, "rb") as f:
            os.fsync(f.fileno())
        # Side files (external weights) first, the model file last: a reader never sees a model whose
        # weights are missing.
        for f in sorted(tmp.iterdir(), key=lambda p: p == target):
            os.replace(f, path.parent / f.name)
    finally:
        model.train(was_training)
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s (%s exporter, %.1f kB)", path, use, path.stat().st_size / 1e3)
    return path


def _session(
    path: str | os.PathLike,
    threads: Optional[int],
    spinning: bool = True,
    provider: str = "CPUExecutionProvider",
) -> Any:
    """An onnxruntime session of the ONNX file (``threads`` intra-op threads, idle threads spinning or
    sleeping, on ``provider``): the one place session options are set."""
    ort = _require("onnxruntime", "running an ONNX model")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: it warns about e.g. unused initialisers of valid files
    sess = ort.InferenceSession(str(path), sess_options=options, providers=[provider])
    if len(sess.get_inputs()) != 1:
        raise ValueError(f"{path} has {len(sess.get_inputs())} inputs; only one-input models are supported")
    return sess


def onnx_runner(
    path: str | os.PathLike, threads: Optional[int] = None, *, spinning: bool = True
) -> Callable[[torch.Tensor], Any]:
    """A function ``x -> list of numpy outputs`` running the ONNX file with onnxruntime on the CPU
    (``threads`` intra-op threads; None: onnxruntime's default, one per physical core). ``spinning=False``
    makes the session's idle threads sleep instead of spin-waiting for work: needed when several sessions
    take turns, since each has its own thread pool and the waiting ones' spinning takes the cores."""
    sess = _session(path, threads, spinning)
    name = sess.get_inputs()[0].name

    def run(x: torch.Tensor) -> Any:
        return sess.run(None, {name: x.detach().cpu().numpy()})

    return run


def check_onnx(
    path: str | os.PathLike,
    model: nn.Module,
    example_inputs: torch.Tensor,
    *,
    other_batch: Optional[int] = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the ONNX file with onnxruntime (CPUExecutionProvider) and compare with ``model`` in eval mode.

    Two inputs: ``example_inputs`` and a random normal batch (``seed``) of ``other_batch`` images
    (default: the example's batch + 2), which proves the batch axis is dynamic. Passes when every
    output has PyTorch's shape and ``max|onnx - torch| <= atol + rtol * max|torch|`` at each batch.
    Returns the batch sizes, ``max_abs_diff``, ``max_abs_output``, ``relative_diff`` (their ratio), the
    tolerances and the onnxruntime version; raises :class:`OnnxCheckError` otherwise.
    """
    ort = _require("onnxruntime", "check_onnx")
    run = onnx_runner(path)
    b = int(example_inputs.shape[0])
    other = other_batch if other_batch is not None else b + 2
    if other == b:
        raise ValueError("other_batch must differ from the example's batch size to test the batch axis")
    g = torch.Generator().manual_seed(seed)
    extra = torch.randn(other, *example_inputs.shape[1:], generator=g).to(example_inputs.dtype)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    per_batch = []
    try:
        for x in (example_inputs, extra):
            with torch.inference_mode():
                ref = [t.detach().float().cpu().numpy() for t in _flatten(model(x.to(device)))]
            got = run(x)
            if len(got) != len(ref) or any(o.shape != r.shape for o, r in zip(got, ref)):
                raise OnnxCheckError(
                    f"{path}: onnxruntime output shapes {[o.shape for o in got]} at batch {x.shape[0]}, "
                    f"PyTorch {[r.shape for r in ref]}"
                )
            diff = max(float(np.abs(o - r).max(initial=0.0)) for o, r in zip(got, ref))
            scale = max(float(np.abs(r).max(initial=0.0)) for r in ref)
            per_batch.append({"batch_size": int(x.shape[0]), "max_abs_diff": diff, "max_abs_output": scale})
    finally:
        model.train(was_training)
    worst = max(per_batch, key=lambda r: r["max_abs_diff"] - rtol * r["max_abs_output"])
    result = {
        "path": str(path),
        "batch_sizes": [r["batch_size"] for r in per_batch],
        "max_abs_diff": max(r["max_abs_diff"] for r in per_batch),
        "max_abs_output": max(r["max_abs_output"] for r in per_batch),
        "rtol": rtol,
        "atol": atol,
        "per_batch": per_batch,
        "onnxruntime": ort.__version__,
        "provider": "CPUExecutionProvider",
    }
    result["relative_diff"] = result["max_abs_diff"] / max(result["max_abs_output"], 1e-30)
    for r in per_batch:
        if not r["max_abs_diff"] <= atol + rtol * r["max_abs_output"]:  # `not <=` also catches NaN
            raise OnnxCheckError(
                f"{path}: onnxruntime and PyTorch differ by {r['max_abs_diff']:.3g} at batch "
                f"{r['batch_size']} (largest |output| {r['max_abs_output']:.3g}; allowed {atol:g} + "
                f"{rtol:g} x that): the ONNX file does not compute the model"
            )
    log.debug("ONNX check of %s passed; worst batch %s", path, worst)
    return result


def onnx_throughput(
    path: str | os.PathLike,
    batch_size: int,
    input_shape: tuple[int, ...] | list[int],
    *,
    warmup: int = 3,
    repeats: int = 10,
    threads: Optional[int] = None,
) -> dict[str, Any]:
    """Median latency (ms) and images/s of the ONNX file under onnxruntime on the CPU, on random inputs of
    shape ``(batch_size, *input_shape)``: ``warmup`` untimed runs, then the median of ``repeats``.
    ``threads``: onnxruntime intra-op threads (None: its default, one per physical core)."""
    ort = _require("onnxruntime", "onnx_throughput")
    run = onnx_runner(path, threads)
    x = torch.randn(batch_size, *input_shape)
    times = time_forward(run, x, warmup=warmup, repeats=repeats)
    med = statistics.median(times)
    return {
        "backend": "onnxruntime",
        "onnxruntime": ort.__version__,
        "batch_size": batch_size,
        "threads": threads,
        "latency_ms": 1e3 * med,
        "latency_ms_min": 1e3 * min(times),
        "throughput": batch_size / med,
    }
