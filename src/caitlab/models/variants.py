"""The named variants: paper Table 3 for CaiT, DeiT Table 1, and two small members of the
family for CPU runs. Each is a small function registered by name, as in timm."""

from __future__ import annotations

from caitlab.models._registry import register_model
from caitlab.models.cait import ImageTransformer

# CaiT: patch 16, 2 class-attention layers, talking heads, LayerScale, qkv bias. The eps
# values are those of the official release (XXS-36 keeps 1e-5); the rest follow the rule.


def _cait(depth: int, embed_dim: int, num_heads: int, eps: float, size: int, overrides: dict):
    args = dict(
        img_size=size, patch_size=16, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, class_token="class_attention", ca_depth=2,
        residual="layerscale", layerscale_init=eps, talking_heads=True,
        drop_path_schedule="uniform",
    )
    return ImageTransformer(**{**args, **overrides})


def _deit(embed_dim: int, num_heads: int, overrides: dict):
    args = dict(
        img_size=224, patch_size=16, embed_dim=embed_dim, depth=12, num_heads=num_heads,
        class_token="input", residual="none", drop_path_schedule="linear",
    )
    return ImageTransformer(**{**args, **overrides})


@register_model
def cait_xxs24_224(**kwargs):
    return _cait(24, 192, 4, 1e-5, 224, kwargs)


@register_model
def cait_xxs24_384(**kwargs):
    return _cait(24, 192, 4, 1e-5, 384, kwargs)


@register_model
def cait_xxs36_224(**kwargs):
    return _cait(36, 192, 4, 1e-5, 224, kwargs)


@register_model
def cait_xxs36_384(**kwargs):
    return _cait(36, 192, 4, 1e-5, 384, kwargs)


@register_model
def cait_xs24_224(**kwargs):
    return _cait(24, 288, 6, 1e-5, 224, kwargs)


@register_model
def cait_xs24_384(**kwargs):
    return _cait(24, 288, 6, 1e-5, 384, kwargs)


@register_model
def cait_xs36_224(**kwargs):
    return _cait(36, 288, 6, 1e-6, 224, kwargs)


@register_model
def cait_s24_224(**kwargs):
    return _cait(24, 384, 8, 1e-5, 224, kwargs)


@register_model
def cait_s24_384(**kwargs):
    return _cait(24, 384, 8, 1e-5, 384, kwargs)


@register_model
def cait_s36_384(**kwargs):
    return _cait(36, 384, 8, 1e-6, 384, kwargs)


@register_model
def cait_s48_224(**kwargs):
    return _cait(48, 384, 8, 1e-6, 224, kwargs)


@register_model
def cait_m24_224(**kwargs):
    return _cait(24, 768, 16, 1e-5, 224, kwargs)


@register_model
def cait_m36_384(**kwargs):
    return _cait(36, 768, 16, 1e-6, 384, kwargs)


@register_model
def cait_m48_448(**kwargs):
    return _cait(48, 768, 16, 1e-6, 448, kwargs)


@register_model
def deit_tiny_patch16_224(**kwargs):
    return _deit(192, 3, kwargs)


@register_model
def deit_small_patch16_224(**kwargs):
    return _deit(384, 6, kwargs)


@register_model
def deit_base_patch16_224(**kwargs):
    return _deit(768, 12, kwargs)


# DeiT's distilled models (its Table 5, the "⚗" rows): a distillation token and second head.


@register_model
def deit_tiny_distilled_patch16_224(**kwargs):
    return _deit(192, 3, {"distillation_token": True, **kwargs})


@register_model
def deit_small_distilled_patch16_224(**kwargs):
    return _deit(384, 6, {"distillation_token": True, **kwargs})


@register_model
def deit_base_distilled_patch16_224(**kwargs):
    return _deit(768, 12, {"distillation_token": True, **kwargs})


# Small members of the family for CPU runs on the digits data (8x8 images, patch 2).


@register_model
def vit_tiny(**kwargs):
    return ImageTransformer(**{**_TINY, "class_token": "input", "residual": "none", **kwargs})


@register_model
def cait_tiny(**kwargs):
    args = {**_TINY, "class_token": "class_attention", "ca_depth": 2, "residual": "layerscale",
            "layerscale_init": "auto", "talking_heads": True}
    return ImageTransformer(**{**args, **kwargs})


_TINY = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4,
             num_heads=4, mlp_ratio=2.0)
