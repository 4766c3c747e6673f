"""Build a model by name: the CIFAR zoo, any torchvision classifier, or ``timm:<name>``.

torchvision and timm are imported only when a name needs them, so ``import chase.models`` stays light.
No pretrained weights are offered (models are trained from scratch by sparse training).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["CIFAR_MODELS", "get_model", "list_models"]

TIMM_PREFIX = "timm:"

# name -> "module:function" inside chase.models, resolved on demand.
CIFAR_MODELS: dict[str, str] = {
    "cifar_resnet20": "cifar_resnet:cifar_resnet20",
    "cifar_resnet32": "cifar_resnet:cifar_resnet32",
    "cifar_resnet56": "cifar_resnet:cifar_resnet56",
    "cifar_resnet18": "cifar_resnet_imagenet_style:cifar_resnet18",
    "cifar_resnet34": "cifar_resnet_imagenet_style:cifar_resnet34",
    "cifar_resnet50": "cifar_resnet_imagenet_style:cifar_resnet50",
    "cifar_vgg16_bn": "cifar_vgg:cifar_vgg16_bn",
    "cifar_vgg19_bn": "cifar_vgg:cifar_vgg19_bn",
    "cifar_mobilenet_v2": "cifar_mobilenet_v2:cifar_mobilenet_v2",
    "cifar_vit_tiny": "cifar_vit:cifar_vit_tiny",
}


def _cifar_builder(name: str) -> Callable[..., nn.Module]:
    module, func = CIFAR_MODELS[name].split(":")
    return getattr(importlib.import_module(f"chase.models.{module}"), func)


def _torchvision_names() -> list[str]:
    try:
        import torchvision.models as tvm
    except ImportError:
        return []
    return sorted(tvm.list_models(module=tvm))


def _timm_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return [TIMM_PREFIX + n for n in timm.list_models()]


def list_models(*, include_torchvision: bool = True, include_timm: bool = False) -> list[str]:
    """Names accepted by :func:`get_model`.

    Args:
        include_torchvision: also list torchvision's classification models (if torchvision is installed).
        include_timm: also list every timm model as ``timm:<name>`` (if timm is installed; a long list).

    Returns:
        The CIFAR zoo names first, then the others, each group sorted.
    """
    names = sorted(CIFAR_MODELS)
    if include_torchvision:
        names += _torchvision_names()
    if include_timm:
        names += _timm_names()
    return names


def _unknown(name: str, candidates: list[str], hint: str = "") -> ValueError:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    msg = f"unknown model name {name!r}."
    if close:
        msg += f" Did you mean: {', '.join(close)}?"
    msg += f"{hint} See chase.models.list_models() for all names (list_models(include_timm=True) for timm)."
    return ValueError(msg)


def _timm_module(name: str) -> Any:
    """timm, after checking that it is installed and knows ``name``."""
    try:
        import timm
    except ImportError as e:
        raise ImportError(
            f"model {TIMM_PREFIX}{name} needs the 'timm' package, which is not installed (pip install timm)"
        ) from e
    if not timm.is_model(name):
        raise _unknown(TIMM_PREFIX + name, _timm_names())
    return timm


def _get_timm_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    return _timm_module(name).create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def get_model(name: str, num_classes: int, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised classification model.

    Args:
        name: a CIFAR zoo name (``cifar_resnet20/32/56``, ``cifar_resnet18/34/50``, ``cifar_vgg16_bn``,
            ``cifar_vgg19_bn``, ``cifar_mobilenet_v2``, ``cifar_vit_tiny``; 32x32 inputs), a torchvision
            classification model name (``resnet50``, ``vgg16_bn``, ...; built with ``weights=None``), or
            ``timm:<name>`` for a timm model (``pretrained=False``; timm must be installed).
        num_classes: size of the classifier output.
        pretrained: load the published weights (torchvision's ``DEFAULT`` weights, which need
            ``num_classes=1000``; timm's ``pretrained=True``); they are downloaded, so this needs network.
        **kwargs: passed to the model constructor (e.g. ``dropout`` for torchvision / CIFAR MobileNetV2).

    Raises:
        ValueError: unknown name (the message lists close matches).
        ImportError: a ``timm:`` name while timm is not installed.
    """
    if pretrained:
        return _pretrained(name, num_classes, **kwargs)
    return _builder(name)(num_classes=num_classes, **kwargs)


def _pretrained(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    name = name.strip()
    _builder(name)  # an unknown name or a missing package fails as it does without pretrained
    try:
        if name.startswith(TIMM_PREFIX):
            timm = _timm_module(name[len(TIMM_PREFIX) :])
            return timm.create_model(
                name[len(TIMM_PREFIX) :], pretrained=True, num_classes=num_classes, **kwargs
            )
        if name.lower() in CIFAR_MODELS:
            raise ValueError(
                f"{name} has no published weights: train it, then start from its run (init_from)"
            )
        import torchvision.models as tvm

        if num_classes != 1000:
            raise ValueError(
                f"torchvision's pretrained {name} has 1000 classes, not {num_classes}: use num_classes=1000"
            )
        return tvm.get_model(name.lower(), weights="DEFAULT", **kwargs)
    except (OSError, RuntimeError) as e:  # no network, a broken download
        raise ValueError(f"could not get the pretrained weights of {name} ({type(e).__name__}: {e})") from e


def check_model_name(name: str) -> None:
    """Raise what :func:`get_model` would raise for ``name`` (``ValueError`` for an unknown name with close
    matches, ``ImportError`` when the needed package is missing) without building a model."""
    _builder(name)


def _builder(name: str) -> Callable[..., nn.Module]:
    """The constructor :func:`get_model` calls for ``name`` (``num_classes`` and kwargs)."""
    name = name.strip()
    if name.startswith(TIMM_PREFIX):
        timm_name = name[len(TIMM_PREFIX) :]
        _timm_module(timm_name)
        return lambda **kw: _get_timm_model(timm_name, **kw)
    if name.lower() in CIFAR_MODELS:
        return _cifar_builder(name.lower())
    tv_names = _torchvision_names()
    if name.lower() in tv_names:
        import torchvision.models as tvm

        return lambda **kw: tvm.get_model(name.lower(), weights=None, **kw)
    hint = "" if tv_names else " (torchvision is not installed, so only the CIFAR zoo is available.)"
    raise _unknown(name, sorted(CIFAR_MODELS) + tv_names, hint)
