"""CIFAR-10 and CIFAR-100 from torchvision's pickle folders, read through DataLoaders."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torchvision.datasets
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T

from caitlab.data.base import (
    FileDataModule,
    held_out_words,
    selection_facts,
    split_permutation,
)
from caitlab.data.errors import DataConfigError, check_float, one_line

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class CifarDataModule(FileDataModule):
    """torchvision CIFAR; ``val_fraction`` of the training set is held out for validation.

    The held-out split is a fixed permutation (:func:`~caitlab.data.base.split_permutation`);
    the test set is the official one. ``val_fraction=0`` trains on all 50k images and
    validates on the test set; ``best.ckpt`` is then chosen on the test images, so the test
    scores the last checkpoint instead (:meth:`selection`).
    Train: RandomCrop(32, padding=4) + horizontal flip (+ bicubic resize to ``img_size``);
    eval: (+ resize); both ToTensor + Normalize with the dataset's per-channel mean/std.
    """

    dataset_name: str
    dataset_cls_name: str
    default_num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    NATIVE_SIZE = 32

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        img_size: int = 32,
        in_chans: int = 3,
        num_classes: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int | str = "auto",
        drop_last: bool = False,
    ) -> None:
        if num_classes is None:
            num_classes = self.default_num_classes
        super().__init__(batch_size=batch_size, img_size=img_size, in_chans=in_chans,
                         num_classes=num_classes, seed=seed, num_workers=num_workers,
                         drop_last=drop_last)
        self.require_in_chans((3,), f"{self.dataset_name} images have 3 channels")
        self.require_num_classes(self.dataset_name, self.default_num_classes)
        self.val_fraction = check_float("val_fraction", val_fraction, 0.0, 0.9)
        self.root = Path(root).expanduser()
        self.download = bool(download)
        if not self.download:
            self._check_files()
        self.test_set: Dataset | None = None

    def selection(self) -> dict:
        """The held-out split chooses ``best.ckpt`` and the test set scores it; with
        ``val_fraction=0`` the test set is the validation split, and scores the last
        checkpoint."""
        # after setup, a fraction too small to hold out one image validates on the test set
        if self.val_fraction and (self.val_set is None or self.val_set is not self.test_set):
            return selection_facts(held_out_words(self.val_fraction, "train"), test_is_val=False)
        return selection_facts("test", test_is_val=True)

    @property
    def dataset_cls(self) -> Any:  # torchvision's CIFAR10 or CIFAR100 (it has no types)
        return getattr(torchvision.datasets, self.dataset_cls_name)

    def _check_files(self) -> None:
        cls = self.dataset_cls
        folder = self.root / cls.base_folder
        hint = "set data.download=true to download it"
        if not self.root.is_dir():
            raise DataConfigError(f"data.root: {self.root} does not exist; {hint}")
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise DataConfigError(f"data.root: {self.root} has no {self.dataset_name} data "
                                  f"({folder / missing[0]} is missing); {hint}")

    def transform(self, train: bool) -> Callable:
        tfs: list[Callable] = []
        if train:
            tfs += [T.RandomCrop(self.NATIVE_SIZE, padding=4), T.RandomHorizontalFlip()]
        if self.img_size != self.NATIVE_SIZE:
            tfs.append(T.Resize((self.img_size, self.img_size),
                                interpolation=T.InterpolationMode.BICUBIC))
        tfs += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(tfs)

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node; the archive holds train and test.
        if self.download:
            self.dataset_cls(str(self.root), train=True, download=True)

    def _load(self, train: bool) -> Any:  # a dataset_cls
        try:
            ds = self.dataset_cls(str(self.root), train=train, transform=self.transform(train))
        except RuntimeError as e:
            raise DataConfigError(f"data.root: {self.root / self.dataset_cls.base_folder} is "
                                  f"missing or corrupted ({one_line(e)}); delete it and set "
                                  "data.download=true") from e
        if len(ds.classes) != self.num_classes:
            raise DataConfigError(f"data.num_classes: {self.num_classes} but {self.root} has "
                                  f"{len(ds.classes)} {self.dataset_name} classes")
        return ds

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            full = self._load(train=True)
            n = len(full)
            n_val = round(self.val_fraction * n)
            perm = split_permutation(n)
            self.train_set = Subset(full, perm[n_val:].tolist())
            if n_val:
                # same images in memory, eval transform
                eval_full = copy.copy(full)
                eval_full.transform = self.transform(train=False)
                eval_full.transforms = type(full.transforms)(eval_full.transform, None)
                self.val_set = Subset(eval_full, perm[:n_val].tolist())
            self._num_train_samples = len(self.train_set)
        self.check_train_batches(stage)
        need_test = stage in (None, "test", "predict") or (
            stage in ("fit", "validate") and self.val_set is None)
        if need_test and self.test_set is None:
            self.test_set = self._load(train=False)
        if self.val_set is None and self.test_set is not None:
            self.val_set = self.test_set  # val_fraction == 0


class Cifar10DataModule(CifarDataModule):
    __doc__ = CifarDataModule.__doc__
    dataset_name = "CIFAR-10"
    dataset_cls_name = "CIFAR10"
    default_num_classes = 10
    mean, std = CIFAR10_MEAN, CIFAR10_STD


class Cifar100DataModule(CifarDataModule):
    __doc__ = CifarDataModule.__doc__
    dataset_name = "CIFAR-100"
    dataset_cls_name = "CIFAR100"
    default_num_classes = 100
    mean, std = CIFAR100_MEAN, CIFAR100_STD
