"""The named variants: paper Table 3 for CaiT, DeiT Table 1, and two small members of the
family for CPU runs. Each is a small function registered by name, as in timm: its arguments
by keyword, then the caller's ``kwargs`` over them.

The presets in ``conf/model/`` hold some of these values, so that a run can override them
(Hydra can only override a key the config holds): ``scripts/model_presets.py`` writes those
lines from here (``caitlab.models.presets``), and tests/test_models.py fails where they differ.
"""

from __future__ import annotations

from typing import Any

from caitlab.models._registry import register_model
from caitlab.models.cait import ImageTransformer

# CaiT: patch 16, 2 class-attention layers, talking heads, LayerScale, qkv bias. The eps
# values are those of the official release (XXS-36 keeps 1e-5); the rest follow the rule.
_CAIT = dict(patch_size=16, class_token="class_attention", ca_depth=2, residual="layerscale",
             talking_heads=True, drop_path_schedule="uniform")
_DEIT = dict(patch_size=16, depth=12, class_token="input", residual="none",
             drop_path_schedule="linear")
# Small members of the family for CPU runs on the digits data (8x8 images, patch 2).
_TINY = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4,
             num_heads=4, mlp_ratio=2.0)


def _cait(**kwargs: Any) -> ImageTransformer:
    return ImageTransformer(**dict(_CAIT, **kwargs))


def _deit(**kwargs: Any) -> ImageTransformer:
    return ImageTransformer(**dict(_DEIT, **kwargs))


@register_model
def cait_xxs24_224(**kwargs: Any) -> ImageTransformer:
    model_args = dict(img_size=224, embed_dim=192, depth=24, num_heads=4, layerscale_init=1e-5)
    return _cait(**dict(model_args, **kwargs))


@register_model
def cait_xxs24_384(**kwargs: Any) -> ImageTransformer:
    model_args = dict(img_size=384, embed_dim=192, depth=24, num_heads=4, layerscale_init=1e-5)
    return _cait(**dict(model_args, **kwargs))


@register_model
def cait_xxs36_224(**kwargs: Any) -> ImageTransformer:
    model_args = dict(img_size=224, embed_dim=192, depth=36, num_heads=4, layerscale_init=1e-5)
    return _cait(**dict(model_args, **kwargs))


@register_model
def cait_xxs36_384(**kwargs: Any) -> ImageTransformer:
    model_args = dict(img_size=384, embed_dim=192, depth=36, num_heads=4, layerscale_init=1e-5)
    return _cait(**dict(model_args, **kwargs))


@register_model
def cait_xs24_224(**kwargs: Any) -> ImageTransformer:
    model_args = dict(img_size=224, embed_dim=288, depth=24, num_heads=6, layerscale_init=1e-5)
    return _cait(**dict(model_args, **kwargs))


@register_model
def cait_xs24_384(**kwargs: Any) -> ImageTransformer:
    model_args = dict(img_size=384, embed_dim=288, depth=24, num_heads=6, layerscale_init=1e-5)
    return _cait(**dict(model_args, **kwargs))


@register_model
def cait_xs36_224(**kwargs: Any) -> ImageTransformer:
    model_args = dict(img_size=224, embed_dim=288, depth=36, num_heads=6, layerscale_init=1e-6)
    return _cait(**dict(model_args, **kwargs))


@register_model
def cait_s24_224(**kwargs: Any) -> ImageTransformer:
    model_args = dict(img_size=224, embed_dim=384, depth=24, num_heads=8, layerscale_init=1e-5)
    return _cait(**dict(model_args, **kwargs))


@register_model
def cait_s24_384(**kwargs: Any) -> ImageTransformer:
    model_args = dict(img_size=384, embed_dim=384, depth=24, num_heads=8, layerscale_init=1e-5)
    return _cait(**dict(model_args, **kwargs))


@register_model
def cait_s36_384(**kwargs: Any) -> ImageTransformer:
    model_args = dict(img_size=384, embed_dim=384, depth=36, num_heads=8, layerscale_init=1e-6)
    return _cait(**dict(model_args, **kwargs))


@register_model
def cait_s48_224(**kwargs: Any) -> ImageTransformer:
    model_args = dict(img_size=224, embed_dim=384, depth=48, num_heads=8, layerscale_init=1e-6)
    return _cait(**dict(model_args, **kwargs))


@register_model
def cait_m24_224(**kwargs: Any) -> ImageTransformer:
    model_args = dict(img_size=224, embed_dim=768, depth=24, num_heads=16, layerscale_init=1e-5)
    return _cait(**dict(model_args, **kwargs))


@register_model
def cait_m36_384(**kwargs: Any) -> ImageTransformer:
    model_args = dict(img_size=384, embed_dim=768, depth=36, num_heads=16, layerscale_init=1e-6)
    return _cait(**dict(model_args, **kwargs))


@register_model
def cait_m48_448(**kwargs: Any) -> ImageTransformer:
    model_args = dict(img_size=448, embed_dim=768, depth=48, num_heads=16, layerscale_init=1e-6)
    return _cait(**dict(model_args, **kwargs))


@register_model
def deit_tiny_patch16_224(**kwargs: Any) -> ImageTransformer:
    model_args = dict(img_size=224, embed_dim=192, num_heads=3)
    return _deit(**dict(model_args, **kwargs))


@register_model
def deit_small_patch16_224(**kwargs: Any) -> ImageTransformer:
    model_args = dict(img_size=224, embed_dim=384, num_heads=6)
    return _deit(**dict(model_args, **kwargs))


@register_model
def deit_base_patch16_224(**kwargs: Any) -> ImageTransformer:
    model_args = dict(img_size=224, embed_dim=768, num_heads=12)
    return _deit(**dict(model_args, **kwargs))


# DeiT's distilled models (its Table 5, the "⚗" rows): a distillation token and second head.


@register_model
def deit_tiny_distilled_patch16_224(**kwargs: Any) -> ImageTransformer:
    model_args = dict(img_size=224, embed_dim=192, num_heads=3, distillation_token=True)
    return _deit(**dict(model_args, **kwargs))


@register_model
def deit_small_distilled_patch16_224(**kwargs: Any) -> ImageTransformer:
    model_args = dict(img_size=224, embed_dim=384, num_heads=6, distillation_token=True)
    return _deit(**dict(model_args, **kwargs))


@register_model
def deit_base_distilled_patch16_224(**kwargs: Any) -> ImageTransformer:
    model_args = dict(img_size=224, embed_dim=768, num_heads=12, distillation_token=True)
    return _deit(**dict(model_args, **kwargs))


@register_model
def vit_tiny(**kwargs: Any) -> ImageTransformer:
    model_args = dict(_TINY, class_token="input", residual="none")
    return ImageTransformer(**dict(model_args, **kwargs))


@register_model
def cait_tiny(**kwargs: Any) -> ImageTransformer:
    model_args = dict(_TINY, class_token="class_attention", ca_depth=2, residual="layerscale",
                      layerscale_init="auto", talking_heads=True)
    return ImageTransformer(**dict(model_args, **kwargs))
