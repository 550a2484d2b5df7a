"""A guard around the one timm augmentation op that current Pillow refuses some draws of.

timm's ``PosterizeIncreasing`` (the ``inc1`` RandAugment of the DeiT/CaiT recipe, AugMix)
keeps ``4 - int(magnitude / 10 * 4)`` bits, 0 at magnitude 10, and its plain ``Posterize``
(RandAugment without ``inc1``, the ``v0`` AutoAugment policy) keeps ``int(magnitude / 10 * 4)``,
0 below magnitude 2.5. With ``mstd0.5`` a magnitude-9 op draws 10 about once in 44 calls, so
about 1 in 700 training images asks for 0 bits (measured: 5 in 4,000 draws). Pillow used to
answer that with a black image (``i & ~255 == 0`` for every level); the Pillow locked here
(13.0) raises ``ValueError: bits must be between or equal to 1 and 8``, which killed a
DataLoader worker, and with it the run, within the first epochs of any real image folder.

:func:`guard_augment_ops` swaps timm's posterize for :func:`posterize` in the ops of a built
transform: the recipe's other ops, probabilities and magnitudes stay exactly timm's, and only
the transforms caitlab builds are touched (timm's module is not patched). The swap relies on
``AugmentOp.aug_fn`` and ``timm.data.auto_augment.posterize`` (timm 1.0.x; pyproject bounds
it); tests/test_data_images.py fails if a timm release moves them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from PIL import Image
from timm.data import auto_augment as timm_aa

_TIMM_POSTERIZE = timm_aa.posterize


def posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize, where keeping 0 bits gives what Pillow gave before it refused 0: black
    (every bit of every channel masked away)."""
    if bits_to_keep >= 1:
        return _TIMM_POSTERIZE(img, bits_to_keep, **kwargs)
    return Image.new(img.mode, img.size)


def augment_ops(transform: Any) -> Iterator[timm_aa.AugmentOp]:
    """Every timm ``AugmentOp`` inside ``transform``: the ops of RandAugment and AugMix, the
    sub-policies of AutoAugment, found through torchvision ``Compose.transforms``."""
    if isinstance(transform, timm_aa.AugmentOp):
        yield transform
    elif isinstance(transform, list | tuple):
        for item in transform:
            yield from augment_ops(item)
    else:
        for attr in ("transforms", "ops", "policy"):
            child = getattr(transform, attr, None)
            if isinstance(child, list | tuple):
                yield from augment_ops(child)


def guard_augment_ops(transform: Any) -> int:
    """Replaces timm's posterize by :func:`posterize` in ``transform``'s ops, in place; returns
    how many ops now use it."""
    guarded = 0
    for op in augment_ops(transform):
        if op.aug_fn is _TIMM_POSTERIZE:
            op.aug_fn = posterize
        guarded += op.aug_fn is posterize
    return guarded
