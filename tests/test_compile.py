"""torch.compile across channel events: one compile per shape change, never a pile-up of recompiles
(Dynamo's recompile limit would otherwise silently send the model back to eager after 8 shapes)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

pytest.importorskip("yaml")

from chase.cli import main


def test_the_trainer_compiles_once_per_shape_change(tmp_path, monkeypatch):
    compile_ = torch.compile
    # The eager backend: the same Dynamo tracing, guards and recompiles as Inductor, without codegen time.
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="eager"))
    from chase.train import loop

    wraps = []
    wrap = loop.TrainState.wrap
    monkeypatch.setattr(loop.TrainState, "wrap", lambda st: (wraps.append(st.step), wrap(st))[1])
    counters.clear()
    sets = [
        "dataset=synthetic",
        "image_size=8",
        "synthetic_train=64",
        "synthetic_test=16",
        "batch_size=8",
        "num_workers=0",
        "epochs=2",
        "model=cifar_resnet20",
        "method=chase",
        "update_every=2",
        "channel_every=1",
        "channel_sparsity=0.7",
        "min_channel_ratio=0",
        "density=0.2",
        "speedup_batch=0",
        "threads=1",
        "compile=true",
        "name=c",
    ]
    assert main(["train", "-q", "--out", str(tmp_path), "--set", *sets]) == 0
    shape_changes = len(wraps) - 1  # the first wrap, then one per event that narrowed the model
    assert shape_changes >= 9, wraps  # more than Dynamo's default recompile limit (8)
    frames = counters["frames"]
    assert frames["total"] == frames["ok"], dict(frames)  # no frame fell back to eager
    # One training graph per shape, plus the evaluation passes' (eval mode: other guards) at epoch ends.
    assert counters["stats"]["unique_graphs"] <= (shape_changes + 1) + 2 * 2, dict(counters["stats"])
