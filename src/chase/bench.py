"""Throughput and latency of inference models (dense vs slim) over batch sizes, dtypes and layouts.

Every configuration is timed honestly or skipped with a note (fp16 on CPU, bf16 on a GPU without it,
a failed ``torch.compile``, out of memory): never substituted by another one. Optionally the same models,
exported to ONNX, are timed with onnxruntime on the CPU next to PyTorch (rows with backend
"onnxruntime"; PyTorch's rows have backend "torch").
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import os
import platform
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

from chase.timing import time_forward

log = logging.getLogger(__name__)

__all__ = ["DTYPES", "benchmark", "format_table", "time_forward"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # platform.processor() is often just "x86_64" on Linux
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _skip_reason(dtype: str, device: torch.device, channels_last: bool, ndim: int) -> Optional[str]:
    if dtype == "fp16" and device.type != "cuda":
        return "fp16 is benchmarked on CUDA only (CPU half-precision convolutions are not a deployment path)"
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16 support"
    if channels_last and ndim != 4:
        return "channels_last needs 4-D (N, C, H, W) inputs"
    return None


def benchmark(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 8, 32),
    dtypes: Sequence[str] = ("fp32",),
    device: str | torch.device = "cpu",
    channels_last: Sequence[bool] = (False,),
    compiled: Sequence[bool] = (False,),
    warmup: int = 3,
    repeats: int = 10,
    macs: Optional[Mapping[str, int]] = None,
    meta: Optional[Mapping[str, Any]] = None,
    onnx: Optional[Mapping[str, str | os.PathLike]] = None,
) -> dict[str, Any]:
    """Time every model of ``models`` ({label: model}, e.g. ``{"dense": m, "slim": s}``) on random inputs
    of shape ``(batch, *input_shape)`` for every combination of the options; the models are copied, not
    changed. Models are timed alternately within a configuration so that machine load affects them alike.

    Returns ``{"meta": ..., "results": [row, ...], "skipped": [...]}``; a row has model, device, dtype,
    batch_size, channels_last, compiled, latency_ms (median), latency_ms_min, throughput (images/s at the
    median), and for every model but the first ``speedup`` (its throughput over the first model's) and,
    when ``macs`` ({label: MACs per image}) is given, ``flops_ratio`` (first model's MACs over its own:
    the speedup the FLOPs predict). Every row has ``backend`` "torch". ``compiled`` configurations use
    ``torch.compile`` with Inductor's inference freezing (weights constant, BatchNorm folded).

    ``onnx`` ({label: ONNX file of that model}, see :func:`chase.onnx.export_onnx`): also time those files
    with onnxruntime, on the same inputs, with as many threads as PyTorch uses: after PyTorch's models,
    alternately among themselves.
    Their rows have backend "onnxruntime", ``speedup`` over the first model under PyTorch and
    ``backend_speedup`` over the same model under PyTorch. Only fp32, eager, contiguous configurations on
    the CPU get them; every other configuration records an onnxruntime skip with its reason (an empty
    mapping asks for those notes only).
    """
    dev = torch.device(device)
    labels = list(models)
    out: dict[str, Any] = {
        "meta": {
            "device": dev.type,
            "device_name": _device_name(dev),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "input_shape": list(input_shape),
            "warmup": warmup,
            "repeats": repeats,
            "macs": dict(macs or {}),
            **(_onnx_meta() if onnx else {}),
            **(meta or {}),
        },
        "results": [],
        "skipped": [],
    }
    for dtype in dtypes:
        for cl in channels_last:
            for comp in compiled:
                cfg = {"dtype": dtype, "channels_last": cl, "compiled": comp}
                reason = _skip_reason(dtype, dev, cl, len(input_shape) + 1)
                if reason is not None:
                    out["skipped"].append({**cfg, "reason": reason})
                    log.info("skipped %s: %s", cfg, reason)
                    continue
                runners = {}
                if onnx is not None:
                    why = _onnx_skip_reason(dev, cfg)
                    if why is not None:
                        out["skipped"].append({**cfg, "backend": "onnxruntime", "reason": why})
                    else:
                        runners = _onnx_runners(onnx)
                _run_config(
                    models, labels, input_shape, batch_sizes, dev, cfg, warmup, repeats, macs, out, runners
                )
    return out


def _onnx_meta() -> dict[str, Any]:
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "onnxruntime_threads": torch.get_num_threads()}


def _onnx_skip_reason(dev: torch.device, cfg: Mapping[str, Any]) -> Optional[str]:
    if dev.type != "cpu":
        return "onnxruntime is timed on the CPU only (CPUExecutionProvider)"
    if cfg["dtype"] != "fp32":
        return "the ONNX files are exported in fp32; onnxruntime rows are for fp32 only"
    if cfg["channels_last"]:
        return "onnxruntime chooses its own memory layout; timed with the contiguous configuration only"
    if cfg["compiled"]:
        return "torch.compile applies to PyTorch only; onnxruntime is timed next to eager"
    return None


def _onnx_runners(onnx: Mapping[str, str | os.PathLike]) -> dict[str, Callable[[torch.Tensor], Any]]:
    from chase.onnx import onnx_runner

    # Same thread count as PyTorch, so the two backends compete on equal terms. No spinning: the sessions
    # take turns, and each one's idle pool spinning beside the running one halved onnxruntime's
    # throughput at 2 threads on a 2-core machine and made its timings erratic.
    threads = torch.get_num_threads()
    return {k: onnx_runner(p, threads=threads, spinning=False) for k, p in onnx.items()}


def _prepare(model: nn.Module, dev: torch.device, cfg: dict[str, Any]) -> nn.Module:
    m = copy.deepcopy(model).eval().to(dev, DTYPES[cfg["dtype"]])
    if cfg["channels_last"]:
        m = m.to(memory_format=torch.channels_last)
    return torch.compile(m) if cfg["compiled"] else m


#: how many compiled entries of one model's forward code one timing process may hold (Dynamo's default: 8).
COMPILED_MODELS_LIMIT = 1024


def _compile_scope(cfg: Mapping[str, Any]) -> contextlib.AbstractContextManager:
    """Where the models of ``cfg`` run (and, compiled, are compiled at their first call): with Inductor's
    inference freezing for compiled ones -- the weights become constants, so BatchNorm is folded into the
    convolutions and weights are pre-packed for the CPU's convolution library, as a model is compiled for
    serving. (``torch.compile(options={"freezing": True})`` does not reach the freezing pass.)

    Every model compiled in one process adds an entry to the cache of the same ``forward`` code; past
    Dynamo's recompile limit (8) the next model would silently run eager. The limit is raised for the
    timing, and a model that still hits it fails (and is recorded as skipped) instead of being timed
    eager under a "compiled" label."""
    if not cfg["compiled"]:
        return contextlib.nullcontext()
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    limits = {"recompile_limit": COMPILED_MODELS_LIMIT, "accumulated_recompile_limit": COMPILED_MODELS_LIMIT}
    limits = {k: max(v, getattr(dynamo_config, k)) for k, v in limits.items()}
    stack = contextlib.ExitStack()
    stack.enter_context(inductor_config.patch(freezing=True))
    stack.enter_context(dynamo_config.patch(fail_on_recompile_limit_hit=True, **limits))
    return stack


def _backend_groups(keys: Sequence[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """``keys`` ((label, backend) pairs) grouped by backend, in order of first appearance."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for key in keys:
        groups.setdefault(key[1], []).append(key)
    return list(groups.values())


def _run_config(
    models: Mapping[str, nn.Module],
    labels: list[str],
    input_shape: Sequence[int],
    batch_sizes: Sequence[int],
    dev: torch.device,
    cfg: dict[str, Any],
    warmup: int,
    repeats: int,
    macs: Optional[Mapping[str, int]],
    out: dict[str, Any],
    runners: Mapping[str, Callable[[torch.Tensor], Any]],
) -> None:
    prepared: dict[tuple[str, str], Any] = {(k, "torch"): _prepare(m, dev, cfg) for k, m in models.items()}
    prepared.update({(k, "onnxruntime"): r for k, r in runners.items()})
    keys = [(k, "torch") for k in labels] + [(k, "onnxruntime") for k in labels if k in runners]
    for bs in batch_sizes:
        x = torch.randn(bs, *input_shape, device=dev, dtype=DTYPES[cfg["dtype"]])
        if cfg["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        times: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
        try:
            with _compile_scope(cfg):
                # One backend after the other, its models alternately: PyTorch's and onnxruntime's
                # thread pools spin after each forward, so interleaving the two backends made each
                # one's first model wait for the other's spinning threads.
                for group in _backend_groups(keys):
                    for k in group:  # warm-up of each model first; a compiled one compiles here, untimed
                        time_forward(
                            prepared[k], x, warmup=max(warmup, 1 if cfg["compiled"] else 0), repeats=0
                        )
                    for _ in range(repeats):  # then one timed forward of each, alternately
                        for k in group:
                            times[k] += time_forward(prepared[k], x, warmup=0, repeats=1)
        except Exception as e:  # OOM, a compiler error: record it, never fake a number
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            out["skipped"].append({**cfg, "batch_size": bs, "reason": reason})
            log.warning("batch %d %s failed: %s", bs, cfg, reason)
            continue
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for key in keys:
            k, backend = key
            med = statistics.median(times[key])
            row = {"model": k, "backend": backend, "device": dev.type, "batch_size": bs, **cfg}
            row.update(latency_ms=1e3 * med, latency_ms_min=1e3 * min(times[key]), throughput=bs / med)
            base = rows.get((labels[0], "torch"))
            if base is not None:
                row["speedup"] = row["throughput"] / base["throughput"]
                if backend != "torch":
                    row["backend_speedup"] = row["throughput"] / rows[(k, "torch")]["throughput"]
                if k != labels[0] and macs and k in macs and labels[0] in macs and macs[k]:
                    row["flops_ratio"] = macs[labels[0]] / macs[k]
            rows[key] = row
            out["results"].append(row)
            log.debug("%s", _fmt_row(row))


def _fmt_row(r: Mapping[str, Any]) -> str:
    speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
    ratio = f"{r['flops_ratio']:.2f}x" if "flops_ratio" in r else ""
    return (
        f"{r['model']:<8} {r.get('backend', 'torch'):<11} {r['device']:<5} {r['dtype']:<5} "
        f"{'cl' if r['channels_last'] else '-':<3} "
        f"{'compiled' if r['compiled'] else 'eager':<9} {r['batch_size']:>5} {r['latency_ms']:>11.3f} "
        f"{r['throughput']:>11.1f} {speed:>8} {ratio:>8}"
    )


def format_table(result: Mapping[str, Any]) -> str:
    """The rows of :func:`benchmark` as a text table, with the skipped configurations below it."""
    m = result["meta"]
    lines = [
        f"{m['device_name']} ({m['device']}), torch {m['torch']}, {m['threads']} threads, {m['date']}; "
        f"median of {m['repeats']} after {m['warmup']} warm-up",
        f"{'model':<8} {'backend':<11} {'dev':<5} {'dtype':<5} {'cl':<3} {'mode':<9} {'batch':>5} "
        f"{'latency ms':>11} "
        f"{'images/s':>11} {'speedup':>8} {'FLOPs':>8}",
    ]
    lines += [_fmt_row(r) for r in result["results"]]
    if any(r.get("backend", "torch") != "torch" for r in result["results"]):
        first = result["results"][0]["model"] if result["results"] else "dense"
        lines.append(f"speedup: images/s over {first} under torch at the same batch, for either backend")
    for s in result["skipped"]:
        where = f" batch {s['batch_size']}" if "batch_size" in s else ""
        who = f"{s['backend']} " if "backend" in s else ""
        lines.append(
            f"skipped {who}{s['dtype']} cl={s['channels_last']} compiled={s['compiled']}{where}: "
            f"{s['reason']}"
        )
    return "\n".join(lines)
