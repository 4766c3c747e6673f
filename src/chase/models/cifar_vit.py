"""A ViT-Tiny-sized vision transformer for 32x32 images (patch size 4: 64 patches and a class token).

Width 192, 3 heads of 64 and MLP 768 as DeiT-Tiny (Touvron et al. 2021), built from timm's
``VisionTransformer`` class (fused ``qkv`` projection, so every attention weight is a sparse ``Linear``
and heads can be removed). Depth is a parameter: the CPU recipe uses 6 blocks so that a comparison of
four methods fits in two hours on two cores.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["cifar_vit_tiny"]


def cifar_vit_tiny(num_classes: int = 10, *, depth: int = 6, **kwargs: Any) -> nn.Module:
    """ViT with patch size 4 on 32x32 inputs: ``depth`` blocks of width 192, 3 heads, MLP 768 (needs timm)."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:
        raise ImportError("cifar_vit_tiny needs the 'timm' package (pip install 'chase-dst[timm]')") from e
    options = {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": depth, "num_heads": 3}
    options.update(kwargs)
    return VisionTransformer(num_classes=num_classes, mlp_ratio=4.0, **options)
