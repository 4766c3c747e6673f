"""Exact ERK / ER / uniform allocation, checked against hand-computed tables."""

from __future__ import annotations

import math

import pytest
import torch

from chase.sparse.distribution import layer_counts, random_masks
from chase.sparse.schedules import cubic_channel_sparsity, soft_bound_extra, swap_fraction
from chase.sparse.topk import topk_indices

# conv1 8x3x3x3 (216 weights), conv2 16x8x3x3 (1152), fc 10x16 (160): 1528 weights in all.
SHAPES = {"conv1.weight": (8, 3, 3, 3), "conv2.weight": (16, 8, 3, 3), "fc.weight": (10, 16)}


def test_erk_hand_table_density_0_1():
    # ERK scores (sum of dims)/(prod of dims) times sizes are 17, 30 and 26; budget round(152.8) = 153;
    # eps = 153/73 gives shares 35.63, 62.88, 54.49 -> floors 35, 62, 54 (151) + the two largest remainders.
    assert layer_counts(SHAPES, 0.1, "erk") == {"conv1.weight": 36, "conv2.weight": 63, "fc.weight": 54}


def test_erk_hand_table_dense_layers_resolved():
    # Budget 764: eps = 764/73 makes fc's density 1.70 -> fc dense (160); re-solve eps = 604/47 makes
    # conv1's density 1.01 -> dense (216); conv2 takes the remaining 388.
    assert layer_counts(SHAPES, 0.5, "erk") == {"conv1.weight": 216, "conv2.weight": 388, "fc.weight": 160}


def test_er_and_uniform_tables():
    # ER ignores kernel dims: scores (8+3)/24 * 216 = 99, (16+8)/128 * 1152 = 216, 26 -> eps = 153/341:
    # shares 44.42, 96.91, 11.67 -> floors 44, 96, 11 (151) + conv2 and fc, the largest remainders.
    assert layer_counts(SHAPES, 0.1, "er") == {"conv1.weight": 44, "conv2.weight": 97, "fc.weight": 12}
    assert layer_counts(SHAPES, 0.1, "uniform") == {"conv1.weight": 22, "conv2.weight": 115, "fc.weight": 16}


@pytest.mark.parametrize("method", ["erk", "er", "uniform"])
@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.2, 0.5, 0.9, 1.0])
def test_total_exact_and_within_one_weight(method, density):
    shapes = {f"l{i}": (16 * (i + 1), 8 * (i + 1), 3, 3) for i in range(6)} | {"fc": (10, 96)}
    counts = layer_counts(shapes, density, method)
    total = sum(math.prod(s) for s in shapes.values())
    assert sum(counts.values()) == round(density * total)
    for name, shape in shapes.items():
        assert 0 <= counts[name] <= math.prod(shape)


def test_random_masks_exact_counts():
    counts = layer_counts(SHAPES, 0.1, "erk")
    masks = random_masks(SHAPES, counts, torch.Generator().manual_seed(0))
    for name, m in masks.items():
        assert m.dtype == torch.bool and tuple(m.shape) == SHAPES[name]
        assert int(m.sum()) == counts[name]


def test_schedules():
    assert swap_fraction(0, start=0.5, horizon=100, floor=0.005) == pytest.approx(0.5)
    assert swap_fraction(50, start=0.5, horizon=100, floor=0.005) == pytest.approx(0.005 + 0.495 / 2)
    assert swap_fraction(100, start=0.5, horizon=100, floor=0.005) == pytest.approx(0.005)
    assert swap_fraction(70, start=0.3, horizon=100, schedule="constant") == 0.3
    assert soft_bound_extra(0, delta0=0.05, end=10) == pytest.approx(0.05)
    assert soft_bound_extra(10, delta0=0.05, end=10) == 0.0
    assert cubic_channel_sparsity(0, final=0.5, end=100) == 0.0
    assert cubic_channel_sparsity(50, final=0.5, end=100) == pytest.approx(0.5 * (1 - 0.125))
    assert cubic_channel_sparsity(200, final=0.5, end=100) == 0.5


@pytest.mark.parametrize("n,k", [(100, 7), (3_000_000, 10_000), (3_000_000, 400_000), (3_000_000, 2_500_000)])
@pytest.mark.parametrize("largest", [True, False])
def test_topk_exact(n, k, largest):
    g = torch.Generator().manual_seed(n + k)
    scores = torch.rand(n, generator=g)
    scores[::5] = 0.5  # many ties
    idx = topk_indices(scores, k, largest=largest)
    assert idx.numel() == k and idx.unique().numel() == k
    ref = torch.topk(scores, k, largest=largest).values
    picked = scores[idx]
    assert torch.equal(picked.sort().values, ref.sort().values)
