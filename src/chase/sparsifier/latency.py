"""A measured latency table: how the forward time of a model depends on each channel group's width.

``chase profile`` (:func:`chase.profile.profile_latency`) writes it on the device the user names; Chase's
``target="latency"`` reads it. The model's latency at given widths is predicted additively: the dense
time plus, for every group, the change measured when that group alone was narrowed (interpolated
linearly between the measured widths).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from chase.io import atomic_write_text

__all__ = ["LATENCY_FORMAT_VERSION", "LatencyTable"]

LATENCY_FORMAT_VERSION = 1


@dataclass
class LatencyTable:
    """Forward latency (ms) of one model on one device, per channel group and width.

    Attributes:
        dense_ms: the dense model's forward time.
        groups: ``{group name: (widths, ms)}``: the model's time with only that group narrowed to each
            width (ascending; the last is the full width, whose time is ``dense_ms``'s measurement).
        meta: device, dtype, batch size, input shape, model name: what it was measured on.
    """

    dense_ms: float
    groups: dict[str, tuple[list[int], list[float]]]
    meta: dict[str, Any] = field(default_factory=dict)

    def group_ms(self, group: str, width: float) -> float:
        """The model's time with ``group`` at ``width`` channels (linear between measured widths)."""
        widths, ms = self.groups[group]
        if width <= widths[0]:
            return ms[0]
        for (w0, m0), (w1, m1) in zip(zip(widths, ms), zip(widths[1:], ms[1:])):
            if width <= w1:
                return m0 + (m1 - m0) * (width - w0) / (w1 - w0)
        return ms[-1]

    def predict_ms(self, widths: Mapping[str, float]) -> float:
        """Predicted forward time with every group at ``widths[group]`` (missing groups: full width)."""
        total = self.dense_ms
        for g, w in widths.items():
            full = self.groups[g][0][-1]
            total += self.group_ms(g, w) - self.group_ms(g, full)
        return total

    def channel_ms(self, group: str, width: float) -> float:
        """What removing one channel of ``group`` at ``width`` saves (ms, at least 0)."""
        return max(0.0, self.group_ms(group, width) - self.group_ms(group, width - 1))

    def mean_channel_ms(self, group: str) -> float:
        """What one channel of ``group`` saves on average over its measured widths (ms; 0 when the group
        was measured at one width only). Unlike :meth:`channel_ms`, not clamped: a falling line shows."""
        widths, ms = self.groups[group]
        span = widths[-1] - widths[0]
        return (ms[-1] - ms[0]) / span if span > 0 else 0.0

    def check_groups(self, widths: Mapping[str, int], params: Optional[int] = None) -> None:
        """Raise ``ValueError`` when a prunable group (name -> its full width) has no measurements, or was
        measured at another full width (a table of another model whose layers have the same names), or
        when the model's parameter count ``params`` is not the one the table recorded of the model it
        measured (another model whose groups have the same names and widths, e.g. torchvision's ResNet-18
        against ResNet-50's table). Tables written before the count was recorded skip that check."""
        missing = [n for n in widths if n not in self.groups]
        if missing:
            raise ValueError(
                f"the latency table has no measurements of group(s) {missing[:5]}: profile the same model "
                "with the same prune_skip/prune_heads/keep_channels (chase profile); it holds "
                f"{list(self.groups)[:5]}"
            )
        other = {n: (self.groups[n][0][-1], w) for n, w in widths.items() if self.groups[n][0][-1] != w}
        if other:
            shown = "; ".join(f"{n}: {t} in the table, {w} here" for n, (t, w) in list(other.items())[:3])
            raise ValueError(
                f"the latency table was measured on other widths ({shown}): it is another model's table; "
                "profile this model (chase profile)"
            )
        measured = self.meta.get("params")
        if params is not None and measured is not None and int(measured) != int(params):
            raise ValueError(
                f"the latency table was measured on a model with {int(measured):,} parameters, this one has "
                f"{int(params):,}: it is another model's table; profile this model (chase profile)"
            )

    # ------------------------------------------------------------------ a cost model (sparsifier.costs)
    def check(self, pruner: Any, example: Any = None) -> None:
        """Refuse a model the table was not measured on (:meth:`check_groups` with the pruner's groups and
        its model's parameter count)."""
        params = sum(p.numel() for p in pruner.module.parameters())
        self.check_groups({g.name: g.width for g in pruner.groups}, params=params)

    def model_ms(self, pruner: Any, example: Any = None) -> float:
        """The forward time the table predicts for ``pruner``'s current widths."""
        return self.predict_ms(pruner.alive_channels())

    def channel_saving_ms(self, pruner: Any, example: Any = None) -> list[float]:
        """Per prunable group of ``pruner``, what removing one channel at its current width saves."""
        alive = pruner.alive_channels()
        return [self.channel_ms(g.name, alive[g.name]) for g in pruner.groups]

    def mean_saving_ms(self, pruner: Any, example: Any = None) -> list[float]:
        """Per prunable group of ``pruner``, the table's mean slope (:meth:`mean_channel_ms`)."""
        return [self.mean_channel_ms(g.name) for g in pruner.groups]

    # ------------------------------------------------------------------ file
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": LATENCY_FORMAT_VERSION,
            "dense_ms": self.dense_ms,
            "groups": {g: {"widths": w, "ms": m} for g, (w, m) in self.groups.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
        """A table from its dict, checked: every time a finite positive number of ms, every group's widths
        positive integers in ascending order with one time each, and the time not falling by half or more
        as a group widens (no measurement does that: a corrupted or hand-made table)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a latency table is a JSON object, got {type(data).__name__}")
        if data.get("format_version") != LATENCY_FORMAT_VERSION:
            raise ValueError(
                f"unsupported latency table format {data.get('format_version')!r} "
                f"(expected {LATENCY_FORMAT_VERSION})"
            )
        dense = _time("dense_ms", data.get("dense_ms"))
        if not isinstance(data.get("groups"), Mapping):
            raise ValueError("a latency table needs 'groups': {group: {'widths': [...], 'ms': [...]}}")
        groups = {}
        for g, v in data["groups"].items():
            if not isinstance(v, Mapping) or "widths" not in v or "ms" not in v:
                raise ValueError(f"group {g!r} needs 'widths' and 'ms' lists")
            w, m = list(v["widths"]), [_time(f"group {g!r}: ms", x) for x in v["ms"]]
            if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in w):
                raise ValueError(f"group {g!r}: widths must be integers >= 1, got {w}")
            if len(w) != len(m) or not w or w != sorted(set(w)):
                raise ValueError(f"group {g!r} needs ascending widths with one time each, got {w} and {m}")
            if m[-1] < 0.5 * m[0]:
                raise ValueError(
                    f"group {g!r}: the model takes {m[0]:g} ms at width {w[0]} and {m[-1]:g} ms at {w[-1]}: "
                    "time falling by half as the group widens is not a measurement"
                )
            groups[g] = (w, m)
        return cls(dense, groups, dict(data.get("meta", {})))

    def save(self, path: Union[str, os.PathLike]) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, source: Union[str, os.PathLike, Mapping[str, Any], LatencyTable]) -> LatencyTable:
        """A table from a JSON file, a dict or a table."""
        if isinstance(source, LatencyTable):
            return source
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        path = pathlib.Path(source)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a latency table ({type(e).__name__}: {e})") from None
        try:
            return cls.from_dict(data)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a usable latency table: {e}") from None


def _time(what: str, value: Any) -> float:
    """``value`` as a time in ms: a finite number > 0 (ValueError naming ``what`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number of ms, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a finite time > 0 ms, got {value!r}")
    return float(value)
