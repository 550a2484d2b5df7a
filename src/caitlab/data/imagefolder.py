"""Image folders in the ImageNet layout, read through DataLoaders with timm's transforms."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.loader import fast_collate
from timm.data.random_erasing import RandomErasing
from torch.utils.data import Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS

from caitlab import compat
from caitlab.data.augment import guard_augment_ops
from caitlab.data.base import (
    FileDataModule,
    held_out_words,
    selection_facts,
    split_permutation,
)
from caitlab.data.errors import (
    DataConfigError,
    check_choice,
    check_float,
    check_int,
    one_line,
)
from caitlab.data.images import (
    DECODE_ERRORS,
    ON_CORRUPT,
    checked_image_folder,
    find_class_folders,
)
from caitlab.data.sampling import RepeatedAugSampler, ResumableSampler, num_images

INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
# random erasing's fill (timm): const (its default: 0 once normalised), rand (one normal
# draw per channel), pixel (a normal draw per pixel: DeiT's --remode)
ERASE_MODES = ("const", "rand", "pixel")


class ImageFolderDataModule(FileDataModule):
    """ImageNet layout: ``root/train/<class>/*`` and ``root/val/<class>/*``.

    ImageNet has no labelled test set. By default (``val_fraction=0``) the val images are both
    the validation and the test split, and the test scores the *last* checkpoint: ``best.ckpt``
    is chosen on the val images, and scoring it on them would favour the variants whose epochs
    are noisiest. ``val_fraction > 0`` holds that fraction of ``train/`` out of training as the
    validation split (a fixed subset: :func:`~caitlab.data.base.split_permutation` of the
    sorted file list, the same images for every seed and on resume), which chooses
    ``best.ckpt``; the val images are then the test split only, and score it.
    Class indices follow the sorted folder names (hidden folders ignored); ``val/`` must have
    the same class folders as ``train/``.
    Transforms are timm's (DeiT/CaiT recipe): training ``create_transform(is_training=True,
    auto_augment, re_prob=reprob, interpolation, color_jitter)`` -- note that timm ignores
    ``color_jitter`` when a RandAugment policy is set, as in DeiT -- and evaluation
    ``create_transform(is_training=False, crop_pct, interpolation)`` (CaiT evaluates at
    ``crop_pct=1.0``). ``on_corrupt``: ``stop`` or ``skip`` an image PIL cannot decode.
    timm's posterize op is guarded (:mod:`caitlab.data.augment`) so that no RandAugment draw
    raises; an ``img_size`` that would shrink photographs to a toy size is refused
    (:meth:`_check_img_size`).

    ``normalize_on_device`` (default): as timm's loader with its prefetcher, the training
    workers decode and augment to uint8 (``fast_collate``: a quarter of the bytes through
    shared memory and to the GPU, no float conversion in the workers) and the batch is
    normalised and randomly erased on the device once transferred
    (:meth:`on_after_batch_transfer`). ``repeated_aug``: DeiT's repeated augmentation, each
    image this many times an epoch, its copies on different ranks (timm's
    ``RepeatAugSampler``; DeiT: 3; 1: off).
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        num_workers: int | str = "auto",
        crop_pct: float = 0.875,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        reprob: float = 0.25,
        remode: str = "const",
        interpolation: str = "bicubic",
        color_jitter: float | None = 0.3,
        seed: int = 0,
        drop_last: bool = True,
        on_corrupt: str = "stop",
        normalize_on_device: bool = True,
        repeated_aug: int = 1,
        val_fraction: float = 0.0,
    ) -> None:
        super().__init__(batch_size=batch_size, img_size=img_size, in_chans=in_chans,
                         num_classes=num_classes, seed=seed, num_workers=num_workers,
                         drop_last=drop_last)
        self.on_corrupt = check_choice("on_corrupt", on_corrupt, ON_CORRUPT)
        self.require_in_chans((3,), "image folders are read as RGB (3 channels)")
        self.interpolation = check_choice("interpolation", interpolation, INTERPOLATIONS)
        self.crop_pct = check_float("crop_pct", crop_pct, 0.0, 1.0, low_open=True)
        self.reprob = check_float("reprob", reprob, 0.0, 1.0)
        self.remode = check_choice("remode", remode, ERASE_MODES)
        if color_jitter is not None:
            color_jitter = check_float("color_jitter", color_jitter, 0.0, 1e9)
        self.color_jitter = color_jitter
        if auto_augment is not None and str(auto_augment).lower() in ("", "none"):
            auto_augment = None
        self.auto_augment = auto_augment
        self.normalize_on_device = bool(normalize_on_device)
        self.repeated_aug = check_int("repeated_aug", repeated_aug, 1)
        self.val_fraction = check_float("val_fraction", val_fraction, 0.0, 0.9)
        self._train_folder: Dataset | None = None
        self.test_set: Dataset | None = None
        self._on_device: tuple[torch.Tensor, torch.Tensor, Callable | None] | None = None
        self.root = Path(root).expanduser()
        self.classes = self._check_folders()
        self._check_img_size()
        self.train_transform, self.eval_transform = self._transforms()
        if self.val_fraction:
            self.held_out()  # a fraction that holds out no image: refused before the run starts

    def _check_folders(self) -> list[str]:
        root = self.root
        if not root.is_dir():
            raise DataConfigError(f"data.root: {root} does not exist")
        found: dict[str, list[str]] = {}
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise DataConfigError(f"data.root: {root} has no {split}/ folder (expected "
                                      "root/train/<class>/ and root/val/<class>/)")
            found[split] = find_class_folders(root / split)
            if not found[split]:
                raise DataConfigError(f"data.root: {root} has no class folders under {split}/")
        train, val = found["train"], found["val"]
        if len(train) != self.num_classes:
            raise DataConfigError(f"data.num_classes: {self.num_classes} but {root}/train/ has "
                                  f"{len(train)} class folders")
        if train != val:
            only_train = sorted(set(train) - set(val))[:3]
            only_val = sorted(set(val) - set(train))[:3]
            raise DataConfigError(f"data.root: {root}/val/ and {root}/train/ have different "
                                  f"class folders (only in train: {only_train}, only in val: "
                                  f"{only_val})")
        return train

    #: Below this, an input size is a digits-sized toy, no size to shrink photographs to
    #: unawares: data.img_size follows model.img_size, 8 for the CPU presets.
    SMALL_IMG_SIZE = 32

    def sample_image_sizes(self, limit: int = 8) -> list[tuple[Path, int, int]]:
        """``(path, width, height)`` of up to ``limit`` training images spread over the first
        class folders, read from the file headers alone (cheap on any folder); files PIL cannot
        open are left out here, and left to ``on_corrupt`` in training."""
        per_class = max(1, math.ceil(limit / len(self.classes)))
        found: list[tuple[Path, int, int]] = []
        for name in self.classes[:limit]:
            taken = 0
            with os.scandir(self.root / "train" / name) as entries:
                for entry in entries:
                    if taken == per_class or len(found) == limit:
                        break
                    if not entry.name.lower().endswith(IMG_EXTENSIONS):
                        continue
                    try:
                        with Image.open(entry.path) as img:
                            found.append((Path(entry.path), *img.size))
                        taken += 1
                    except DECODE_ERRORS:
                        continue
        return found

    def _check_img_size(self) -> None:
        """Refuses shrinking photographs to a toy size: a folder of images at least 4x larger
        (median short side) than an ``img_size`` under :attr:`SMALL_IMG_SIZE`, which is what
        an image folder gets when ``model.img_size`` is left at a CPU preset's 8."""
        size = self.img_size
        if size >= self.SMALL_IMG_SIZE:
            return
        sizes = self.sample_image_sizes()
        if not sizes:
            return
        shorts = sorted(min(w, h) for _, w, h in sizes)
        short = shorts[len(shorts) // 2]
        if short < 4 * size:
            return
        path, w, h = next(s for s in sizes if min(s[1], s[2]) == short)
        suggest = 224 if short >= 224 else max(self.SMALL_IMG_SIZE, short // 16 * 16)
        raise DataConfigError(
            f"data.img_size={size} (it follows model.img_size) would shrink images like {path} "
            f"({w}x{h} px) to {size}x{size} px; set model.img_size={suggest} (or another size "
            f"the model's patch_size divides), or resize the files if {size} px is meant")

    def _transforms(self) -> tuple[Callable, Callable]:
        try:
            # with use_prefetcher, timm leaves out ToTensor, Normalize and RandomErasing: the
            # device does them (on_after_batch_transfer)
            train = create_transform(input_size=self.img_size, is_training=True,
                                     auto_augment=self.auto_augment, re_prob=self.reprob,
                                     re_mode=self.remode,
                                     interpolation=self.interpolation,
                                     # None: none (timm's type leaves None out)
                                     color_jitter=cast(float, self.color_jitter),
                                     use_prefetcher=self.normalize_on_device)
        except (AssertionError, ValueError, KeyError) as e:
            raise DataConfigError(f"data.auto_augment: {self.auto_augment!r} is not a timm "
                                  f"augmentation policy ({one_line(e)})") from e
        guard_augment_ops(train)
        evaluation = create_transform(input_size=self.img_size, is_training=False,
                                      crop_pct=self.crop_pct, interpolation=self.interpolation)
        return train, evaluation

    def _load(self, split: str, transform: Callable) -> Dataset:
        try:
            return checked_image_folder(str(self.root / split), transform, self.on_corrupt)
        except FileNotFoundError as e:
            raise DataConfigError(f"data.root: {one_line(e)}") from e

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            train = self._train_images()
            self.train_set = Subset(train, self.held_out()[0]) if self.val_fraction else train
            self._num_train_samples = num_images(self.train_set)
        self.check_train_batches(stage)
        if self.val_set is None:
            if self.val_fraction:
                # the same files, read with the evaluation transform
                train = compat.with_transform(self._train_images(), self.eval_transform)
                self.val_set = Subset(train, self.held_out()[1])
            else:
                self.val_set = self._load("val", self.eval_transform)
        if self.test_set is None:
            self.test_set = (self._load("val", self.eval_transform) if self.val_fraction
                             else self.val_set)

    def _train_images(self) -> Dataset:
        """``train/`` with the training transform, listed once."""
        if self._train_folder is None:
            self._train_folder = self._load("train", self.train_transform)
        return self._train_folder

    def held_out(self) -> tuple[list[int], list[int]]:
        """``(training, validation)`` indices into ``train/``'s sorted images: the first
        ``val_fraction`` of :func:`~caitlab.data.base.split_permutation` held out, each in
        file order. A pure function of the file list, so a resumed run holds out the same
        images.

        Raises:
            DataConfigError: ``val_fraction`` holds out no image, or leaves none to train on.
        """
        n = num_images(self._train_images())
        n_val = round(self.val_fraction * n)
        if not 0 < n_val < n:
            raise DataConfigError(f"data.val_fraction={self.val_fraction} of {n} training "
                                  f"images holds out {n_val}; hold out at least one and leave "
                                  "some to train on, or set data.val_fraction=0")
        perm = split_permutation(n).tolist()
        return sorted(perm[n_val:]), sorted(perm[:n_val])

    def selection(self) -> dict:
        """A held-out part of ``train/`` chooses ``best.ckpt`` and ``val/`` scores it; without
        one, ``val/`` validates and scores the last checkpoint."""
        if self.val_fraction:
            return selection_facts(held_out_words(self.val_fraction, "train/"),
                                   test_is_val=False)
        return selection_facts("val/", test_is_val=True)

    def collate_fn(self, train: bool) -> Callable | None:
        """uint8 training batches (timm's ``fast_collate``) when normalising on the device."""
        if train and self.normalize_on_device:
            return fast_collate
        return None

    def train_sampler(self, ds: Dataset) -> ResumableSampler | None:
        if self.repeated_aug == 1:
            return None
        rank, world = self._rank_world()
        return RepeatedAugSampler(ds, num_replicas=world, rank=rank, seed=self.seed,
                                  repeats=self.repeated_aug, batch_size=self.batch_size,
                                  drop_last=self.drop_last)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """A uint8 training batch, now on the device: normalised (ImageNet mean and std, as
        the evaluation transform does), then randomly erased (``reprob``; ``remode``: the
        box's fill), as timm's prefetcher does. Evaluation batches come normalised from their
        transform."""
        x, y = batch
        if x.dtype != torch.uint8:
            return batch
        if self._on_device is None or self._on_device[0].device != x.device:
            mean = torch.tensor([255 * m for m in IMAGENET_DEFAULT_MEAN], device=x.device)
            std = torch.tensor([255 * s for s in IMAGENET_DEFAULT_STD], device=x.device)
            erase: Callable | None = RandomErasing(self.reprob, mode=self.remode, max_count=1,
                                  device=x.device) if self.reprob > 0 else None
            self._on_device = (mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1), erase)
        mean, std, erase = self._on_device
        x = x.float().sub_(mean).div_(std)
        return (erase(x) if erase is not None else x), y
