"""Initial sparsity distributions (uniform, ER, ERK) with exact integer counts, and random initial masks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

DISTRIBUTIONS = ("uniform", "er", "erk")


def _raw_score(shape: Sequence[int], method: str) -> float:
    if method == "uniform":
        return 1.0
    if method == "erk":  # RigL's Erdos-Renyi-Kernel: (sum of all dims) / (product of all dims)
        dims = list(shape)
    elif method == "er":  # Erdos-Renyi: kernel dims ignored
        dims = list(shape[:2])
    else:
        raise ValueError(f"unknown distribution {method!r}; choose one of {DISTRIBUTIONS}")
    return sum(dims) / math.prod(dims)


def layer_counts(shapes: Mapping[str, Sequence[int]], density: float, method: str = "erk") -> dict[str, int]:
    """Number of weights to keep in each layer so the total is exactly ``round(density * all weights)``.

    The per-layer densities follow ``method``: ``uniform`` (the same everywhere), ``er`` or ``erk``
    (density proportional to ``sum(dims) / prod(dims)``, RigL's formula, one scale factor solved for
    the budget). A layer whose density would exceed 1 becomes dense and the rest is re-solved, largest
    first, as RigL does. The fractional counts are rounded by largest remainder, so the total is exact
    and each layer is within one weight of its real-valued share.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(sizes.values())
    budget = round(density * total)
    raw = {n: _raw_score(s, method) for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        rest = budget - sum(sizes[n] for n in dense)
        divisor = sum(raw[n] * sizes[n] for n in sizes if n not in dense)
        eps = rest / divisor if divisor > 0 else 0.0
        over = [n for n in sizes if n not in dense and eps * raw[n] > 1.0]
        if not over:
            break
        top = max(raw[n] for n in over)
        dense.update(n for n in over if raw[n] == top)
    share = {n: float(sizes[n]) if n in dense else min(eps * raw[n] * sizes[n], sizes[n]) for n in sizes}
    counts = {n: math.floor(v) for n, v in share.items()}
    # Largest remainder: hand out the weights lost to flooring, one per layer, biggest fraction first.
    short = budget - sum(counts.values())
    order = sorted(sizes, key=lambda n: (counts[n] - share[n], n))
    for n in order:
        if short <= 0:
            break
        if counts[n] < sizes[n]:
            counts[n] += 1
            short -= 1
    return counts


def random_masks(
    shapes: Mapping[str, Sequence[int]],
    counts: Mapping[str, int],
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Boolean CPU masks with exactly ``counts[name]`` True entries, uniformly placed by ``generator``."""
    masks = {}
    for name, shape in shapes.items():
        n = math.prod(shape)
        flat = torch.zeros(n, dtype=torch.bool)
        flat[torch.randperm(n, generator=generator)[: counts[name]]] = True
        masks[name] = flat.view(*shape)
    return masks
