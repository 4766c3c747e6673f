"""Per-channel buffers a module's own code applies (issue 27): torchvision's and timm's frozen BatchNorms
(ResNet-FPN detection backbones), and any module that scales or shifts its channels by buffers. The
channels reach those buffers through the module's ops; they are sliced with the group, and a tensor
computed from weights alone (a frozen norm's shift) is not a second activation, so it makes no residual
stream."""

from __future__ import annotations

import pathlib

import pytest
import torch
from torch import nn

import chase
from chase import ChannelSpec
from chase.check import check_model

torchvision = pytest.importorskip("torchvision")
X = torch.randn(2, 3, 32, 32)


def _randomized(model: nn.Module) -> nn.Module:
    """Non-trivial statistics and affine terms in every frozen norm, so a wrong slice shows."""
    g = torch.Generator().manual_seed(1)
    for name, b in model.named_buffers():
        leaf = name.rpartition(".")[2]
        if leaf in ("running_mean", "bias"):
            b.uniform_(-0.5, 0.5, generator=g)
        elif leaf in ("running_var", "weight"):
            b.uniform_(0.5, 1.5, generator=g)
    return model


def _frozen_resnet18() -> nn.Module:
    from torchvision.ops import FrozenBatchNorm2d

    return _randomized(torchvision.models.resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d))


def _timm_frozen_resnet() -> nn.Module:
    timm = pytest.importorskip("timm")
    from timm.layers import freeze_batch_norm_2d

    return _randomized(freeze_batch_norm_2d(timm.create_model("resnet18", num_classes=10)))


def test_frozen_batchnorm_groups_are_prunable_as_batchnorm_ones_are():
    frozen = chase.channel_groups(_frozen_resnet18(), X)
    plain = chase.channel_groups(torchvision.models.resnet18(num_classes=10), X)
    assert [(g.name, g.prunable) for g in frozen.groups] == [(g.name, g.prunable) for g in plain.groups]
    assert sum(g.prunable for g in frozen.groups) == 8  # every group outside the residual stream
    inner = frozen["layer1.0.conv1"]
    tensors = {s.tensor for s in inner.slots}
    assert {f"layer1.0.bn1.{b}" for b in ("weight", "bias", "running_mean", "running_var")} <= tensors


@pytest.mark.parametrize("build", [_frozen_resnet18, _timm_frozen_resnet], ids=["torchvision", "timm"])
@pytest.mark.parametrize("prune_skip", [False, True])
def test_a_frozen_batchnorm_network_shrinks_and_reloads_exactly(build, prune_skip):
    report = check_model(build, X, ChannelSpec(channel_sparsity=0.5, prune_skip=prune_skip))
    assert report.status == "pass", report.error
    assert report.params_slim < report.params_dense and report.rel_diff <= 1e-5


class ScaledByBuffer(nn.Module):
    """A conv whose output channels are scaled by a registered (non-learned) per-channel buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.register_buffer("gain", torch.linspace(0.5, 2.0, 8))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x) * self.gain.view(1, -1, 1, 1) + self.gain[:, None, None].sqrt())
        return self.head(self.conv2(y).mean((2, 3)))


def test_a_per_channel_buffer_of_any_module_is_sliced_with_its_channels():
    model = ScaledByBuffer()
    group = chase.channel_groups(model, X)["conv1"]
    assert group.prunable and "gain" in {s.tensor for s in group.slots}
    result = chase.prune_channels(model, X, channels=ChannelSpec(channel_sparsity=0.5))
    kept = model.conv1.out_channels
    assert result.removed["conv1"] == 8 - kept > 0 and model.gain.shape == (kept,)
    model(X)  # the forward still runs at the new width


def _small_detector() -> nn.Module:
    """A ResNet-18-FPN Faster R-CNN with torchvision's FrozenBatchNorm2d backbone, a narrow box head and few
    proposals: the layers of torchvision's ResNet-FPN detectors, seconds on a CPU."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    small = {
        "box_head": TwoMLPHead(backbone.out_channels * 7 * 7, 64),
        "box_predictor": FastRCNNPredictor(64, 3),
        **{f"rpn_{k}_nms_top_n_{m}": 50 for k in ("pre", "post") for m in ("train", "test")},
        "box_batch_size_per_image": 32,
    }
    return _randomized(FasterRCNN(backbone, min_size=48, max_size=64, **small))


@pytest.fixture
def sweep(monkeypatch):
    """benchmarks/coverage.py, whose detector inputs and loss the tests share."""
    import importlib.util

    folder = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))  # it imports its neighbour common.py
    # by its path: "coverage" is also the name of coverage.py's package
    spec = importlib.util.spec_from_file_location("chase_coverage_sweep", folder / "coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_a_resnet_fpn_detector_trains_through_its_loss_dict_shrinks_and_reloads_exactly(sweep):
    """The coverage sweep's detector check: trained on random boxes for a list of images of two sizes."""
    torch.set_num_threads(1)
    report = check_model(
        _small_detector,
        sweep.example_inputs("detection:x", 48),
        ChannelSpec(channel_sparsity=0.5),
        loss=sweep.detection_loss,
        steps=6,
    )
    assert report.status == "pass", report.error
    assert report.prunable_groups >= 8 and report.params_slim < 0.8 * report.params_dense
    assert report.rel_diff <= 1e-5


def test_discovery_of_an_fpn_detector_takes_seconds(sweep):
    """Torch-Pruning's group query compared every dependency with the whole group so far: 116 s for this
    model on this CPU (most of it in Group.has_pruning_op), 5 s with the group's set of what it holds."""
    import time

    model = _small_detector().eval()
    start = time.perf_counter()
    groups = chase.channel_groups(model, sweep.example_inputs("detection:x", 48))
    assert time.perf_counter() - start < 40
    assert sum(g.prunable for g in groups.groups) >= 8
