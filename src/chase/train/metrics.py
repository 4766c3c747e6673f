"""A run's ``metrics.jsonl``: the writer (JSON lines + TensorBoard scalars), the reader, and the training
cost computed from its records."""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from chase.flops import StepCost, training_flops
from chase.io import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["METRICS_FILE", "Metrics", "read_metrics", "training_cost"]

METRICS_FILE = "metrics.jsonl"


def _kept(record: dict[str, Any], step: int) -> bool:
    return record.get("step", 0) <= step and record.get("kind") != "final"


class Metrics:
    """JSON lines (one object per event), passed on to the run's loggers (:mod:`chase.train.loggers`);
    a no-op on ranks other than 0."""

    def __init__(
        self,
        run_dir: pathlib.Path,
        enabled: bool,
        loggers: Callable[[int], list[Any]] = lambda resume_step: [],
        resume_step: int = -1,
    ) -> None:
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self.loggers: list[Any] = []
        if not enabled:
            return
        if resume_step >= 0 and self.path.exists():
            # Lines written after the checkpoint by the interrupted process would be repeated: drop them
            # (and a line torn by a crash or a full disk); rewrite atomically, never half the history.
            keep = [r for r in _parse(self.path) if _kept(r, resume_step)]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        elif resume_step < 0 and self.path.exists():  # a new run in a folder whose first run died early
            self.path.unlink()
        self.loggers = loggers(resume_step)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def training_cost(records: Sequence[dict[str, Any]], steps: int, batch_size: int) -> dict[str, float]:
    """Training MACs of a run from its metrics: RigL's accounting (``chase.training_flops``) over the
    per-step forward cost that the ``start`` and ``cost`` records describe (density, widths, and which
    steps computed a dense gradient). Returns ``{}`` when the run has no ``start`` record."""
    start = next((r for r in records if r.get("kind") == "start"), None)
    if start is None or not start.get("macs"):
        return {}
    changes = {r["step"]: r for r in records if r.get("kind") == "cost"}

    def log() -> Iterator[StepCost]:
        now = start
        for t in range(1, steps + 1):
            rec = changes.get(t)
            # Step t ran with the state before its own update; the update's cost is its dense gradient.
            yield StepCost(now["macs_sparse"] / now["macs"], now["macs"], bool(rec and rec["update"]))
            now = rec or now

    total = training_flops(log(), update_every=None, batch_size=batch_size)
    return {
        "train_macs": round(total.total),
        "train_macs_dense": round(total.dense_total),
        "train_macs_ratio": total.ratio,
        "dense_gradient_steps": total.update_steps,
    }


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run folder's ``metrics.jsonl`` (empty when it has none)."""
    path = pathlib.Path(run_dir) / METRICS_FILE
    return _parse(path) if path.exists() else []


def _parse(path: pathlib.Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a line that is not a JSON object (torn by a crash or a full disk
    during an append) is skipped with a warning, never an error: the checkpoint, not this log, is what a
    resume needs."""
    records, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            torn += 1
    if torn:
        log.warning("%s: skipped %d unreadable line(s) (a write torn by a crash or a full disk)", path, torn)
    return records
