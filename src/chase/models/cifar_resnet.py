"""ResNet-20/32/56 for CIFAR (He et al. 2016, Sec. 4.2), with projection (option B) shortcuts.

Three stages of ``n`` basic blocks with 16/32/64 channels on a 3x3 16-channel stem; ``depth = 6n + 2``.
Where a block changes shape (stride 2 or a new width) the shortcut is a 1x1 convolution + batch norm
(option B) instead of the paper's zero-padding (option A), so that channel-pruning tools see real layers.
This adds a few thousand parameters over the paper's figures (0.27M / 0.46M / 0.85M).
"""

from __future__ import annotations

import torch
from torch import nn

from chase.models._init import kaiming_init

__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet20", "cifar_resnet32", "cifar_resnet56"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual ``+``; 1x1 conv-BN projection when the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` (3 stages of ``n`` basic blocks, widths 16/32/64)."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 for CIFAR (n = 3)."""
    return CifarResNet(20, num_classes)


def cifar_resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 for CIFAR (n = 5)."""
    return CifarResNet(32, num_classes)


def cifar_resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 for CIFAR (n = 9)."""
    return CifarResNet(56, num_classes)
