"""One model per family from the coverage sweep's list (benchmarks/coverage_models.yaml, key ``ci``):
Chase must build, train through its channel events, shrink, export and reload each one with the same
outputs. A regression in any family fails here; the whole sweep is ``benchmarks/coverage.py``."""

from __future__ import annotations

import pathlib

import pytest
import torch
import yaml

from chase import ChannelSpec
from chase.check import check_model
from chase.models import get_model

LIST = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "coverage_models.yaml"
CI = yaml.safe_load(LIST.read_text())["ci"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CI))
def test_family(name: str) -> None:
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    options = CI[name] or {}
    size, kwargs = options.get("input", 32), options.get("kwargs") or {}
    torch.set_num_threads(1)
    report = check_model(
        lambda: get_model(name, num_classes=10, **kwargs),
        torch.randn(2, 3, size, size),
        ChannelSpec(channel_sparsity=0.5, prune_skip=True),
        steps=6,
    )
    assert report.ok, report.summary()
    assert report.prunable_groups > 0 and report.params_slim < report.params_dense, report.summary()
