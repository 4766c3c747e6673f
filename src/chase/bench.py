"""Throughput and latency of inference models (dense vs slim) over batch sizes, dtypes, layouts and
backends.

Every model is deployed as it would be served (:func:`chase.deploy.deploy`: eager PyTorch, Inductor,
onnxruntime, OpenVINO; BatchNorm folded; outputs checked against the eager model), and every
configuration is timed honestly or skipped with a note (fp16 on CPU, bf16 on a GPU without it, a backend
that cannot run the model, out of memory): never substituted by another one. Every row names its
backend, device, dtype, batch, layout and whether TF32 was on; dense and slim run under the same backend.
"""

from __future__ import annotations

import datetime
import logging
import platform
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

from chase.deploy import BACKENDS, DTYPES, Deployed, DeployError, deploy, tf32_enabled
from chase.timing import time_forward

log = logging.getLogger(__name__)

__all__ = ["DTYPES", "benchmark", "format_table", "time_forward"]


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


def benchmark(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 8, 32),
    dtypes: Sequence[str] = ("fp32",),
    device: str | torch.device = "cpu",
    channels_last: Sequence[bool] = (False,),
    backends: Sequence[str] = ("eager",),
    compiled: Optional[Sequence[bool]] = None,
    onnx: Optional[Mapping[str, Any]] = None,
    warmup: int = 3,
    repeats: int = 10,
    macs: Optional[Mapping[str, int]] = None,
    meta: Optional[Mapping[str, Any]] = None,
    inductor_mode: Optional[str] = None,
) -> dict[str, Any]:
    """Time every model of ``models`` ({label: model}, e.g. ``{"dense": m, "slim": s}``) on random inputs
    of shape ``(batch, *input_shape)`` for every combination of dtype, layout and backend, each model
    deployed as a user would serve it (:func:`chase.deploy.deploy`); the models are not changed. Within a
    configuration the models run under the same backend and are timed alternately, so that machine load
    affects them alike.

    Returns ``{"meta": ..., "results": [row, ...], "skipped": [...]}``. A row has model, backend, device,
    dtype, batch_size, channels_last, compiled (backend inductor), tf32, max_relative_diff (the deployed
    model against eager fp32), latency_ms (median), latency_ms_min, latency_ms_max, throughput (images/s
    at the median); every model but the first has ``speedup`` (the first model's median time over its own,
    same backend) with ``speedup_spread`` (the least and largest of that ratio over the alternating
    repeats) and, with ``macs`` ({label: MACs per image}), ``flops_ratio`` (the speedup the FLOPs predict);
    a backend other than eager also ``backend_speedup`` (over the same model in eager). A configuration a
    backend cannot run is a skip with its reason. ``compiled`` (``[False, True]``: eager and inductor) and
    ``onnx`` (also onnxruntime; the files are exported by :func:`~chase.deploy.deploy`) are the options
    of earlier releases. ``inductor_mode``: :func:`~chase.deploy.deploy`'s ``mode`` for the inductor rows.
    """
    dev = torch.device(device)
    labels = list(models)
    chosen = list(backends)
    if compiled is not None:
        chosen = ["inductor" if c else "eager" for c in compiled]
    if onnx is not None and "onnxruntime" not in chosen:
        chosen.append("onnxruntime")
    unknown = [b for b in chosen if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    out: dict[str, Any] = {
        "meta": {
            "device": dev.type,
            "device_name": _device_name(dev),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "tf32": tf32_enabled() if dev.type == "cuda" else False,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "input_shape": list(input_shape),
            "backends": chosen,
            "warmup": warmup,
            "repeats": repeats,
            "macs": dict(macs or {}),
            **(meta or {}),
        },
        "results": [],
        "skipped": [],
    }
    for dtype in dtypes:
        for cl in channels_last:
            eager: dict[tuple[str, int], dict[str, Any]] = {}
            for backend in chosen:
                cfg = {
                    "dtype": dtype,
                    "channels_last": cl,
                    "backend": backend,
                    "compiled": backend == "inductor",
                }
                if backend == "inductor" and inductor_mode is not None:
                    cfg["mode"] = inductor_mode
                if cl and len(input_shape) != 3:
                    out["skipped"].append({**cfg, "reason": "channels_last needs 4-D (N, C, H, W) inputs"})
                    continue
                _run_config(
                    models, labels, input_shape, batch_sizes, dev, cfg, (warmup, repeats), macs, out, eager
                )
    return out


def _run_config(
    models: Mapping[str, nn.Module],
    labels: list[str],
    input_shape: Sequence[int],
    batch_sizes: Sequence[int],
    dev: torch.device,
    cfg: dict[str, Any],
    timing: tuple[int, int],
    macs: Optional[Mapping[str, int]],
    out: dict[str, Any],
    eager: dict[tuple[str, int], dict[str, Any]],
) -> None:
    """Every batch size of one configuration: the models deployed (once; per batch size under inductor,
    which compiles, and captures CUDA graphs, for the batch it serves), then timed alternately."""
    warmup, repeats = timing
    deployed: dict[str, Deployed] = {}
    per_batch = cfg["backend"] == "inductor"
    for i, bs in enumerate(batch_sizes):
        x = torch.randn(bs, *input_shape, device=dev)
        try:
            if per_batch or not deployed:
                deployed = {k: _deployed(m, x, dev, cfg) for k, m in models.items()}
            for d in deployed.values():  # warm-up of each model first (a compiled one compiled in deploy)
                time_forward(d, x, warmup=max(warmup, 1), repeats=0)
            times: dict[str, list[float]] = {k: [] for k in labels}
            for _ in range(repeats):  # then one timed forward of each, alternately
                for k in labels:
                    times[k] += time_forward(deployed[k], x, warmup=0, repeats=1)
        except ImportError:
            raise  # an optional package to install: the caller's error
        except Exception as e:  # a backend that cannot run it, out of memory: a skip, never a made-up number
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            # the result lists every skip (format_table prints them): progress only here
            log.info(
                "skipped %s %s cl=%s batch %d: %s",
                cfg["backend"],
                cfg["dtype"],
                cfg["channels_last"],
                bs,
                reason,
            )
            rest = batch_sizes[i:] if isinstance(e, DeployError) and not per_batch else [bs]
            out["skipped"] += [{**cfg, "batch_size": b, "reason": reason} for b in rest]
            if len(rest) > 1:
                return
            deployed = {}
            continue
        for k in labels:
            row = _row(k, bs, dev, cfg, times, labels[0], deployed[k].info, macs)
            if cfg["backend"] == "eager":
                eager[(k, bs)] = row
            elif (k, bs) in eager:
                row["backend_speedup"] = row["throughput"] / eager[(k, bs)]["throughput"]
            out["results"].append(row)
            log.debug("%s", _fmt_row(row))


def _deployed(model: nn.Module, x: torch.Tensor, dev: torch.device, cfg: Mapping[str, Any]) -> Deployed:
    return deploy(
        model,
        x,
        backend=cfg["backend"],
        dtype=cfg["dtype"],
        device=dev,
        channels_last=cfg["channels_last"],
        mode=cfg.get("mode"),
    )


def _row(
    k: str,
    bs: int,
    dev: torch.device,
    cfg: Mapping[str, Any],
    times: Mapping[str, list[float]],
    first: str,
    info: Mapping[str, Any],
    macs: Optional[Mapping[str, int]],
) -> dict[str, Any]:
    med = statistics.median(times[k])
    row: dict[str, Any] = {"model": k, "device": dev.type, "batch_size": bs, **cfg}
    row.update(tf32=info["tf32"], max_relative_diff=info.get("max_relative_diff"))
    if cfg["backend"] == "inductor":
        row["cuda_graphs"] = info["cuda_graphs"]
    row.update(
        latency_ms=1e3 * med,
        latency_ms_min=1e3 * min(times[k]),
        latency_ms_max=1e3 * max(times[k]),
        throughput=bs / med,
    )
    if k != first:
        row["speedup"] = statistics.median(times[first]) / med
        ratios = [b / t for b, t in zip(times[first], times[k])]
        row["speedup_spread"] = [min(ratios), max(ratios)]
        if macs and k in macs and first in macs and macs[k]:
            row["flops_ratio"] = macs[first] / macs[k]
    return row


def _fmt_row(r: Mapping[str, Any]) -> str:
    speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
    spread = "{:.2f}-{:.2f}".format(*r["speedup_spread"]) if "speedup_spread" in r else ""
    ratio = f"{r['flops_ratio']:.2f}x" if "flops_ratio" in r else ""
    return (
        f"{r['model']:<8} {r['backend']:<11} {r['device']:<5} {r['dtype']:<5} "
        f"{'cl' if r['channels_last'] else '-':<3} {'on' if r.get('tf32') else '-':<4} {r['batch_size']:>5} "
        f"{r['latency_ms']:>11.3f} {r['throughput']:>11.1f} {speed:>8} {spread:>11} {ratio:>8}"
    )


def format_table(result: Mapping[str, Any]) -> str:
    """The rows of :func:`benchmark` as a text table, with the skipped configurations below it."""
    m = result["meta"]
    lines = [
        f"{m['device_name']} ({m['device']}), torch {m['torch']}, {m['threads']} threads, {m['date']}; "
        f"median of {m['repeats']} after {m['warmup']} warm-up",
        f"{'model':<8} {'backend':<11} {'dev':<5} {'dtype':<5} {'cl':<3} {'tf32':<4} {'batch':>5} "
        f"{'latency ms':>11} {'images/s':>11} {'speedup':>8} {'(min-max)':>11} {'FLOPs':>8}",
    ]
    lines += [_fmt_row(r) for r in result["results"]]
    if result["results"]:
        first = result["results"][0]["model"]
        lines.append(
            f"speedup: {first}'s median time over the model's, same backend, dtype, layout and batch; "
            "(min-max): over the alternating repeats"
        )
    for s in result["skipped"]:
        where = f" batch {s['batch_size']}" if "batch_size" in s else ""
        lines.append(f"skipped {s['backend']} {s['dtype']} cl={s['channels_last']}{where}: {s['reason']}")
    return "\n".join(lines)
