"""Shared pieces of the benchmark scripts: timing, machine description, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from chase.timing import time_calls

RESULTS = Path(__file__).resolve().parent / "results"


def timeit(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds (``chase.timing``: CUDA-synchronised when a GPU is in use)."""
    return statistics.median(time_calls(fn, warmup=warmup, repeats=repeats))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {
        "device": device,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write(stem: str, payload: dict[str, Any], markdown: str, folder: Path = RESULTS) -> Path:
    """Write ``<folder>/<stem>.json`` and ``.md`` (default folder ``results/``); returns the JSON path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    (folder / f"{stem}.md").write_text(markdown)
    return path
