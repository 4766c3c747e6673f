"""ResNet-18/34/50 with ImageNet widths (64..512) ported to 32x32 CIFAR inputs.

The common CIFAR port used by the RigL / Chase papers' CIFAR experiments: the ImageNet ResNet's
7x7 stride-2 stem and max-pool are replaced by a single 3x3 stride-1 convolution, so the four stages
run at 32, 16, 8 and 4 pixels. Shortcuts that change shape are 1x1 conv + batch norm projections.
ResNet-18/34 use basic blocks; ResNet-50 uses bottleneck blocks (expansion 4, stride on the 3x3 conv).
"""

from __future__ import annotations

import torch
from torch import nn

from chase.models._init import kaiming_init

__all__ = ["Bottleneck", "CifarResNetLarge", "cifar_resnet18", "cifar_resnet34", "cifar_resnet50"]


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class BasicBlockLarge(nn.Module):
    """Two 3x3 conv-BN layers with a residual ``+``."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut = _projection(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4) conv-BN layers with a residual ``+``."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu3 = nn.ReLU(inplace=True)
        self.shortcut = _projection(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


class CifarResNetLarge(nn.Module):
    """ImageNet-width ResNet (stages of 64/128/256/512 planes) with a 3x3 stride-1 stem, no max-pool."""

    def __init__(
        self,
        block: type[BasicBlockLarge] | type[Bottleneck],
        num_blocks: tuple[int, int, int, int],
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 64
        stages = []
        for planes, stride, n in zip((64, 128, 256, 512), (1, 2, 2, 2), num_blocks):
            blocks = []
            for i in range(n):
                blocks.append(block(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet18(num_classes: int = 10) -> CifarResNetLarge:
    """ResNet-18 (basic blocks 2-2-2-2) for CIFAR."""
    return CifarResNetLarge(BasicBlockLarge, (2, 2, 2, 2), num_classes)


def cifar_resnet34(num_classes: int = 10) -> CifarResNetLarge:
    """ResNet-34 (basic blocks 3-4-6-3) for CIFAR."""
    return CifarResNetLarge(BasicBlockLarge, (3, 4, 6, 3), num_classes)


def cifar_resnet50(num_classes: int = 10) -> CifarResNetLarge:
    """ResNet-50 (bottleneck blocks 3-4-6-3) for CIFAR."""
    return CifarResNetLarge(Bottleneck, (3, 4, 6, 3), num_classes)
