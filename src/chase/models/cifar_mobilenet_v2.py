"""MobileNetV2 (Sandler et al. 2018) adapted to 32x32 CIFAR inputs.

Same inverted-residual stages as the ImageNet network (width multiplier 1.0, 1280-channel head, ReLU6),
with the stem made stride 1 and the second stage's stride 2 -> 1 (the common CIFAR port), so the
spatial size goes 32 -> 32 -> 16 -> 8 -> 4 instead of 224 -> 7. Residual ``+`` only where a block keeps
both stride 1 and its width, as in the paper; the expansion-1 first block has no expand convolution.
"""

from __future__ import annotations

import torch
from torch import nn

from chase.models._init import kaiming_init

__all__ = ["CifarMobileNetV2", "InvertedResidual", "cifar_mobilenet_v2"]

# (expansion t, output channels c, repeats n, first stride s); stage 2 uses s=1 instead of 2 for CIFAR.
_CONFIG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise (strided), 1x1 linear projection; ``x +`` when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn_relu(in_ch, hidden, 1))
        layers += [
            _conv_bn_relu(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 for CIFAR: stride-1 3x3 stem (32 ch), 17 inverted residuals, 1x1 head (1280 ch)."""

    def __init__(self, num_classes: int = 10, last_channel: int = 1280, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu(3, 32, 3, stride=1)]
        in_ch = 32
        for t, c, n, s in _CONFIG:
            for i in range(n):
                layers.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t))
                in_ch = c
        layers.append(_conv_bn_relu(in_ch, last_channel, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(last_channel, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(self.dropout(x))


def cifar_mobilenet_v2(num_classes: int = 10, dropout: float = 0.0) -> CifarMobileNetV2:
    """MobileNetV2 (width 1.0) for CIFAR; ``dropout`` before the classifier (0 disables it)."""
    return CifarMobileNetV2(num_classes, dropout=dropout)
