"""VGG-16-BN and VGG-19-BN for CIFAR, as in the sparse-training literature (SNIP, GraSP, RigL, Chase).

Conv3x3-BN-ReLU stacks (configurations D and E of Simonyan & Zisserman) with five 2x2 max-pools, which
bring a 32x32 input to 1x1x512; then a global average pool (the identity at 32x32, kept so that other
input sizes work), a flatten to 512 features and ONE linear classifier (no 4096-wide FC layers).
"""

from __future__ import annotations

import torch
from torch import nn

from chase.models._init import kaiming_init

__all__ = ["CifarVGG", "cifar_vgg16_bn", "cifar_vgg19_bn"]

_CONFIGS: dict[str, list[int | str]] = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", *[512, 512, 512, 512, "M"] * 2],
}


class CifarVGG(nn.Module):
    """VGG with batch norm: ``features`` (conv-BN-ReLU and max-pools), global pool, one linear layer."""

    def __init__(self, config: list[int | str], num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                out_channels = int(v)
                layers += [
                    nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                ]
                in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def cifar_vgg16_bn(num_classes: int = 10) -> CifarVGG:
    """VGG-16-BN (13 conv layers) for CIFAR."""
    return CifarVGG(_CONFIGS["vgg16"], num_classes)


def cifar_vgg19_bn(num_classes: int = 10) -> CifarVGG:
    """VGG-19-BN (16 conv layers) for CIFAR."""
    return CifarVGG(_CONFIGS["vgg19"], num_classes)
