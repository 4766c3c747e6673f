"""Weight initialisation shared by the CIFAR model zoo."""

from __future__ import annotations

from torch import nn


def kaiming_init(model: nn.Module) -> None:
    """Initialise ``model`` in place with the standard Kaiming scheme.

    Convolutions: Kaiming-normal (``fan_out``, ReLU gain), bias zero. Batch norms: weight 1, bias 0.
    Linear layers: normal(0, 0.01), bias zero (as torchvision's VGG / MobileNetV2 classifiers).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
