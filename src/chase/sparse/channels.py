"""Pure channel-level functions: channel scores and the global water-filling selection."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

CHANNEL_SCORES = ("umm", "kept_mean", "density")


def channel_score(
    weight: torch.Tensor, mask: torch.Tensor | None, original_row_numel: int, kind: str = "umm"
) -> torch.Tensor:
    """Score of each output channel (row along dim 0) of one producer weight.

    ``umm`` (the paper's Unmasked Mean Magnitude): mean |w| over the WHOLE original filter, masked zeros
    included, so it mixes how many weights a channel kept with how large they are. ``kept_mean``: mean
    |w| over kept weights only. ``density``: kept weights / original filter size. ``original_row_numel``
    is the filter size before any input channel was removed (removed inputs hold zeros anyway).
    """
    rows = weight.detach().reshape(weight.shape[0], -1)
    if kind == "umm":
        return rows.abs().sum(1) / original_row_numel
    if mask is None:
        mask = torch.ones_like(rows, dtype=torch.bool)
    kept = mask.reshape(mask.shape[0], -1).sum(1)
    if kind == "density":
        return kept.to(rows.dtype) / original_row_numel
    if kind == "kept_mean":
        return rows.abs().sum(1) / kept.clamp(min=1).to(rows.dtype)
    raise ValueError(f"unknown channel score {kind!r}; choose one of {CHANNEL_SCORES}")


def water_fill(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    caps: Sequence[int],
    quota: int,
    costs: Sequence[int] | None = None,
    at_least: bool = False,
) -> torch.Tensor:
    """Pick the channels with the lowest scores overall until ``quota`` is met, at most ``caps[g]`` from
    group ``g``.

    Exact water-filling: walk all channels from the lowest score up, skipping a channel once its group
    has given all it may (it reached its floor), until the quota is met. Ties go to the earlier entry.
    With ``costs`` (channels per entry of group ``g``, e.g. a grouped conv's units) the quota counts
    channels: the walk stops at the count nearest to ``quota`` (within half the crossing entry's cost), or
    with ``at_least`` at the first count that reaches it (a budget that must be met).
    Returns positions into ``scores`` (fewer than the quota only when the caps allow no more).
    """
    if quota <= 0 or scores.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    order = torch.sort(scores, stable=True).indices
    gid = group_ids[order]
    # Rank of each channel within its own group, in score order: a stable sort by group id keeps the
    # score order inside each group, so rank = position - first position of that group.
    by_group = torch.sort(gid, stable=True).indices
    sorted_gid = gid[by_group]
    n_groups = len(caps)
    starts = torch.searchsorted(sorted_gid, torch.arange(n_groups, device=gid.device))
    rank = torch.empty_like(gid)
    rank[by_group] = torch.arange(gid.numel(), device=gid.device) - starts[sorted_gid]
    cap = torch.as_tensor(list(caps), dtype=torch.long, device=gid.device)
    keep = rank < cap[gid]
    eligible = order[keep]
    if costs is None or all(c == 1 for c in costs):
        return eligible[:quota]
    cost = torch.as_tensor(list(costs), dtype=torch.long, device=gid.device)[gid[keep]]
    total = cost.cumsum(0)
    n = int(torch.searchsorted(total, torch.tensor(quota, device=total.device)))  # first total >= quota
    if n >= total.numel():
        return eligible
    before = int(total[n - 1]) if n > 0 else 0
    take = n + 1 if at_least or int(total[n]) - quota <= quota - before else n
    return eligible[:take]


def aligned_blocks(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    alive: Sequence[int],
    floors: Sequence[int],
    units: Sequence[int],
    multiple: int,
) -> tuple[list[torch.Tensor], list[int], list[int], list[float], list[bool]]:
    """Cut every group's channels into removal blocks that keep its alive channel count a multiple of
    ``multiple`` (counting a unit as ``units[g]`` channels).

    Within a group the channels are taken lowest score first: the first block removes the remainder that
    aligns the group (``alive mod multiple``, when the floor allows it), every later block ``multiple``
    channels, never below the floor rounded up to a multiple. A group narrower than ``multiple`` gets no
    block (it keeps its width). Returns, per block: member positions into ``scores``, its group, its cost
    in channels, its score (the mean of its members') and whether it is forced (an alignment remainder).
    """
    members: list[torch.Tensor] = []
    gids: list[int] = []
    costs: list[int] = []
    block_scores: list[float] = []
    forced: list[bool] = []
    for g, (a, floor, u) in enumerate(zip(alive, floors, units)):
        step = multiple // math.gcd(multiple, u)  # entries per aligned block: step * u channels
        if a * u < multiple:
            continue
        pos = (group_ids == g).nonzero().squeeze(1)
        pos = pos[torch.sort(scores[pos], stable=True).indices]
        low = -(-floor // step) * step  # the floor, rounded up to a whole block
        aligned = a - a % step
        start = 0
        if aligned != a and aligned >= max(floor, step):
            members.append(pos[: a - aligned])
            start = a - aligned
            forced.append(True)
        elif aligned != a:
            continue  # aligning would break the floor: the group keeps its width
        left = a - start
        while left - step >= max(low, step):
            members.append(pos[start : start + step])
            forced.append(False)
            start += step
            left -= step
        for m in members[len(gids) :]:
            gids.append(g)
            costs.append(int(m.numel()) * u)
            block_scores.append(float(scores[m].float().mean()))
    return members, gids, costs, block_scores, forced
