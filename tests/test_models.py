"""Model zoo: every CIFAR network builds and runs, parameter counts, registry errors."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

from chase.models import get_model, list_models
from chase.models.registry import CIFAR_MODELS

# Exact counts for num_classes=10. Reference figures: ResNet-20/32/56 0.27M/0.46M/0.85M with the paper's
# zero-padding (option A) shortcuts; our 1x1 conv-BN projections (option B) add 512+64 + 2048+128 = 2,752.
# ImageNet-style CIFAR ResNet-18/34/50 11.17M/21.28M/23.52M and MobileNetV2 2.24M as commonly quoted;
# VGG-16/19-BN 14.72M/20.04M (the often quoted 20,040,522 includes 5,504 conv biases that precede BN,
# which we drop as redundant).
EXPECTED_PARAMS = {
    "cifar_resnet20": 272_474,
    "cifar_resnet32": 466_906,
    "cifar_resnet56": 855_770,
    "cifar_resnet18": 11_173_962,
    "cifar_resnet34": 21_282_122,
    "cifar_resnet50": 23_520_842,
    "cifar_vgg16_bn": 14_724_042,
    "cifar_vgg19_bn": 20_035_018,
    "cifar_mobilenet_v2": 2_236_682,
    "cifar_vit_tiny": 2_693_578,
}


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_expected_table_covers_zoo() -> None:
    assert set(EXPECTED_PARAMS) == set(CIFAR_MODELS)
    assert list_models(include_torchvision=False) == sorted(CIFAR_MODELS)


@pytest.mark.parametrize("name", sorted(CIFAR_MODELS))
def test_cifar_model_forward_and_params(name: str) -> None:
    torch.manual_seed(0)
    model = get_model(name, num_classes=10)
    assert _num_params(model) == EXPECTED_PARAMS[name]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_num_classes_argument() -> None:
    model = get_model("cifar_mobilenet_v2", num_classes=7)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_cifar_model_trains_one_step() -> None:
    model = get_model("cifar_resnet20", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in model.parameters())


def test_option_b_projection_shortcuts() -> None:
    model = get_model("cifar_resnet20", num_classes=10)
    projections = [m for n, m in model.named_modules() if n.endswith("shortcut.0")]
    assert len(projections) == 2
    assert all(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in projections)


def test_torchvision_name() -> None:
    pytest.importorskip("torchvision")
    model = get_model("resnet18", num_classes=5)
    assert model.fc.out_features == 5
    assert "resnet50" in list_models()
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_unknown_name_suggests() -> None:
    with pytest.raises(ValueError, match="cifar_resnet20") as info:
        get_model("cifar_resnet_20", num_classes=10)
    assert "list_models" in str(info.value)
    pytest.importorskip("torchvision")
    with pytest.raises(ValueError, match="resnet50"):
        get_model("resnet_50", num_classes=10)


def test_timm_without_timm_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install timm"):
        get_model("timm:resnet50", num_classes=10)


def test_timm_models_build_and_train(tmp_path: pathlib.Path) -> None:
    """``timm:<name>`` builds a timm model (no pretrained weights), an unknown one suggests close names,
    and the trainer trains one with Chase."""
    pytest.importorskip("timm")
    from chase.cli import main

    model = get_model("timm:resnet18d", num_classes=7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="timm:resnet18d"):
        get_model("timm:resnet18dd", num_classes=7)
    sets = ["dataset=synthetic", "image_size=16", "synthetic_train=32", "synthetic_test=16", "batch_size=16"]
    sets += ["epochs=2", "model=timm:resnet18d", "update_every=1", "channel_every=1", "channel_end_epoch=1"]
    sets += ["density=0.2", "speedup_batch=0", "threads=1", "name=timm", "tensorboard=false"]
    assert main(["train", "-q", "--out", str(tmp_path), "--set", *sets]) == 0
    assert (tmp_path / "timm" / "slim.pt").exists()


def test_import_is_light() -> None:
    code = "import sys, chase.models; assert 'torchvision' not in sys.modules and 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
