"""Model zoo: CIFAR networks plus lazy access to torchvision and timm classifiers.

Use :func:`get_model` (by name) and :func:`list_models`. The CIFAR classes live in ``cifar_resnet``,
``cifar_resnet_imagenet_style``, ``cifar_vgg`` and ``cifar_mobilenet_v2``; torchvision and timm are
imported only when a name needs them.
"""

from chase.models.registry import check_model_name, get_model, list_models

__all__ = ["check_model_name", "get_model", "list_models"]
