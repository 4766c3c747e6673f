"""Prune-and-grow on flat masks: pure functions of scores and counts (no model, no optimizer)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from chase.sparse.topk import topk_indices


def magnitude_scores(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``|t|`` of all tensors, flattened and concatenated (one fresh buffer, safe to modify)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors]).abs_()


def prune_smallest(mask: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """Turn off the ``n`` kept entries of flat ``mask`` with the smallest ``scores``; return their indices.

    ``scores`` is consumed (overwritten where the mask is off).
    """
    # Negated in place and ranked largest-first: saves the copy that ``largest=False`` would make.
    scores.neg_().masked_fill_(~mask, float("-inf"))
    idx = topk_indices(scores, n, largest=True)
    mask[idx] = False
    return idx


def grow_largest(
    mask: torch.Tensor, scores: torch.Tensor, n: int, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Turn on the ``n`` masked entries of ``mask`` with the largest ``scores`` (only where ``allowed``).

    ``scores`` is consumed. Returns the grown indices.
    """
    scores.masked_fill_(mask, float("-inf"))
    if allowed is not None:
        scores.masked_fill_(~allowed, float("-inf"))
    idx = topk_indices(scores, n, largest=True)
    mask[idx] = True
    return idx


def per_layer_prune_grow(
    mask: torch.Tensor,
    prune_scores: torch.Tensor,
    grow_scores: torch.Tensor,
    offsets: Sequence[int],
    swaps: Sequence[int],
) -> torch.Tensor:
    """Per-layer exploration: in layer ``i`` (flat slice ``offsets[i]:offsets[i+1]``), prune ``swaps[i]``
    smallest-score kept entries, then grow ``swaps[i]`` largest-score entries among those off after pruning.

    Growth may pick an entry pruned in the same update, as RigL allows (the caller restarts it from zero).
    Returns the flat indices of the pruned entries.
    """
    prune_scores.masked_fill_(~mask, float("inf"))
    pruned = []
    for i, n in enumerate(swaps):
        if n <= 0:
            continue
        lo, hi = offsets[i], offsets[i + 1]
        m = mask[lo:hi]
        idx = topk_indices(prune_scores[lo:hi], n, largest=False)
        m[idx] = False
        pruned.append(idx + lo)
        g = grow_scores[lo:hi].masked_fill_(m, float("-inf"))
        m[topk_indices(g, n, largest=True)] = True
    return torch.cat(pruned) if pruned else torch.zeros(0, dtype=torch.long, device=mask.device)
