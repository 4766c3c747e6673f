"""When a sparsifier acts over a run: its exploration and channel schedules, resolved from options that are
optimizer steps or fractions of the run.

Pure (no model, no tensors): the constructors resolve their schedule here, and the trainer's config runs
the same resolution before any data is read, so a schedule that cannot work is refused at once. A
schedule point given as an ``int`` is an optimizer step and is checked as given; a ``float`` in [0, 1] is
a fraction of the run (``int(f * total_steps)``) and, like the defaults (which are fractions), it is moved
back to where the run's update interval makes it work: the soft bound and gradual pruning end at the
last exploration update at the latest, channel events end before it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["ChannelSchedule", "Schedule", "channel_schedule", "resolve_schedule", "step_at"]


def step_at(value: Any, total_steps: int) -> Optional[int]:
    """A schedule point as an optimizer step: None stays None, an integer is a step, a float is a fraction
    of ``total_steps`` (rounded down)."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    return int(float(value) * total_steps)


def _fraction(value: Any) -> bool:
    return value is not None and not isinstance(value, numbers.Integral)


@dataclass(frozen=True)
class Schedule:
    """The exploration schedule of a run (all in optimizer steps).

    Attributes:
        total_steps: steps in the run.
        update_every: steps between exploration updates.
        end_step: updates happen before this step.
        last_update: the last update step (0: none).
        soft_bound_end: MEST's soft bound has decayed to 0 here.
        prune_start, prune_end: gradual pruning from ``initial_density`` runs between these.
    """

    total_steps: int
    update_every: int
    end_step: int
    last_update: int
    soft_bound_end: int
    prune_start: int
    prune_end: int

    def update_after(self, t: int) -> bool:
        """Whether an exploration update happens at some step after ``t``."""
        return self.last_update > t


def resolve_schedule(
    total_steps: int,
    *,
    update_every: int,
    end_step: Any = None,
    soft_bound: float = 0.0,
    soft_bound_end: Any = None,
    gradual: bool = False,
    prune_start: Any = 0,
    prune_end: Any = None,
    explores: bool = True,
    end_fraction: Optional[float] = None,
    soft_bound_end_fraction: Optional[float] = None,
    name: str = "the sparsifier",
) -> Schedule:
    """The exploration schedule, or ``ValueError`` naming the option that makes it unworkable.

    ``end_step`` defaults to ``end_fraction`` of the run (None: the whole run), ``soft_bound_end`` to
    ``soft_bound_end_fraction`` of it or the last update, whichever is earlier, ``prune_end`` to half of
    ``end_step``; ``explores=False`` (a static mask) makes no update. ``gradual``: the run prunes from an
    initial density, which needs updates up to ``prune_end``.
    """
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    if end_step is None:
        end = total_steps if end_fraction is None else max(1, int(end_fraction * total_steps))
    else:
        end = step_at(end_step, total_steps)
    if end < 1:
        raise ValueError(f"end_step must be >= 1 (the step updates stop at), got {end_step}")
    last = 0
    if explores:
        last = max(0, (min(end, total_steps + 1) - 1) // update_every * update_every)
    if soft_bound_end is None or _fraction(soft_bound_end):
        fraction = soft_bound_end_fraction if soft_bound_end is None else float(soft_bound_end)
        sb_end = last or end
        if fraction is not None:
            sb_end = min(sb_end, max(1, int(fraction * total_steps)))
    else:
        sb_end = int(soft_bound_end)
    if soft_bound > 0 and last and sb_end > last:
        raise ValueError(
            f"soft_bound_end={sb_end} is after the last exploration update (step {last}, "
            f"update_every={update_every}, end_step={end}): the extra density would never be pruned back "
            f"and the run would end above its budget; use soft_bound_end <= {last}"
        )
    start = step_at(prune_start, total_steps) or 0
    if prune_end is None:
        stop = max(1, end // 2)
    elif _fraction(prune_end):
        stop = min(step_at(prune_end, total_steps), last) if last else step_at(prune_end, total_steps)
    else:
        stop = int(prune_end)
    if gradual:
        if not 0 <= start < stop:
            raise ValueError(f"prune_start={start} must be >= 0 and before prune_end={stop}")
        if not last:
            raise ValueError(
                f"{name} makes no exploration update, so it cannot prune gradually: initial_density must "
                "equal density"
            )
        if stop > last:
            raise ValueError(
                f"prune_end={stop} is after the last exploration update (step {last}): the run would never "
                f"reach its density; end the pruning at or before step {last}"
            )
    return Schedule(total_steps, int(update_every), end, last, sb_end, start, stop)


@dataclass(frozen=True)
class ChannelSchedule:
    """Chase's channel events: at ``offset + k * every`` (k >= 1) up to ``end``.

    Attributes:
        offset: half an exploration interval, so that the freed weights regrow at the next update.
        every: steps between events.
        end: the last step an event may fall on (the paper's T_chan).
        events: the event steps.
    """

    offset: int
    every: int
    end: int
    events: tuple[int, ...]

    @property
    def last_event(self) -> int:
        """The last event (0: none), where the schedule reaches its final sparsity."""
        return self.events[-1] if self.events else 0

    def is_event(self, t: int) -> bool:
        k, rem = divmod(t - self.offset, self.every)
        return rem == 0 and k >= 1 and t <= self.end


def channel_schedule(
    schedule: Schedule, *, every: int, end: Any = None, prunes: bool = True
) -> ChannelSchedule:
    """Chase's channel events for ``schedule``, or ``ValueError`` when channels are to be removed
    (``prunes``) and no event fits, or the last one has no exploration update after it (the freed weights
    would never regrow and the run would end below its budget). ``end`` defaults to the soft bound's end,
    before the last update; a fraction of the run is moved back as far."""
    last = schedule.last_update
    if end is None or _fraction(end):
        stop = schedule.soft_bound_end if end is None else step_at(end, schedule.total_steps)
        stop = min(stop, last - 1) if last > 1 else stop
    else:
        stop = int(end)
    offset = schedule.update_every // 2
    first = offset + every
    events = tuple(range(first, min(stop, schedule.total_steps) + 1, every))
    out = ChannelSchedule(offset, every, stop, events)
    if prunes and not events:
        raise ValueError(
            f"no channel event fits in this run: the first would come at step {first} (half an update "
            f"interval, {offset}, plus channel_every={every}), after channel_end={stop} of "
            f"{schedule.total_steps} steps; lower channel_every or update_every, or train longer"
        )
    if prunes and not schedule.update_after(out.last_event):
        raise ValueError(
            f"no exploration update comes after the last channel event (step {out.last_event}; updates "
            f"every {schedule.update_every} steps until end_step={schedule.end_step}): the weights freed by "
            "removed channels would never be regrown and the run would end below its budget. End the "
            "channel events earlier (channel_end) or explore longer (end_step)"
        )
    return out
