"""Pure schedule functions of the optimizer step ``t``: swap fraction, soft-bound extra, channel sparsity."""

from __future__ import annotations

import math

SWAP_SCHEDULES = ("cosine", "constant")


def cosine_decay(t: int, horizon: int, start: float, end: float = 0.0) -> float:
    """``end + (start - end) * (1 + cos(pi * t / horizon)) / 2``, held at ``end`` once ``t >= horizon``."""
    if horizon <= 0 or t >= horizon:
        return end
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t / horizon))


def swap_fraction(
    t: int, *, start: float, horizon: int, schedule: str = "cosine", floor: float = 0.0
) -> float:
    """Fraction of the kept weights that an exploration update prunes and regrows at step ``t``.

    ``cosine`` (RigL): decays from ``start`` to ``floor`` over ``horizon`` steps; with ``start=0.5``,
    ``floor=0.005`` and ``horizon`` the whole run it is Chase's ``0.005 + 0.495 (1 + cos(pi t / T))/2``.
    ``constant`` (SET): always ``start``.
    """
    if schedule == "constant":
        return start
    if schedule == "cosine":
        return cosine_decay(t, horizon, start, floor)
    raise ValueError(f"unknown swap schedule {schedule!r}; choose one of {SWAP_SCHEDULES}")


def soft_bound_extra(t: int, *, delta0: float, end: int) -> float:
    """MEST's soft memory bound: extra density ``delta(t)`` held between updates, 0 from ``end`` on."""
    return cosine_decay(t, end, delta0, 0.0)


def gradual_density(t: int, *, initial: float, final: float, start: int, end: int) -> float:
    """Density allowed after step ``t`` when pruning gradually (Zhu & Gupta; GraNet): ``initial`` until
    ``start``, then ``final + (initial - final)(1 - (t - start)/(end - start))^3``, ``final`` from ``end``."""
    if t <= start:
        return initial
    if t >= end or end <= start:
        return final
    return final + (initial - final) * (1.0 - (t - start) / (end - start)) ** 3


def cubic_channel_sparsity(t: int, *, final: float, end: int) -> float:
    """Target channel sparsity ``final * (1 - (1 - t/end)^3)`` (gradual magnitude pruning's cubic ramp)."""
    if end <= 0 or t >= end:
        return final
    return final * (1.0 - (1.0 - t / end) ** 3)
