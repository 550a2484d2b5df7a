"""scikit-learn's bundled 8x8 digits, held in memory: the CPU-sized benchmark."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from caitlab.data.base import InMemoryDataModule, split_permutation
from caitlab.data.errors import DataConfigError, check_float


class DigitsDataModule(InMemoryDataModule):
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes): a CPU-sized benchmark.

    Pixels 0..16 are scaled to [0, 1], optionally resized (bilinear) to ``img_size`` and
    repeated to 3 channels, then normalised with the training split's scalar mean and std.
    The split (``test_fraction`` / ``val_fraction`` / rest for training) is one fixed
    permutation (:func:`~caitlab.data.base.split_permutation`), identical for every run seed.
    """

    NUM_IMAGES = 1797
    NUM_CLASSES = 10
    NATIVE_SIZE = 8

    def __init__(
        self,
        batch_size: int = 128,
        img_size: int = 8,
        in_chans: int = 1,
        num_classes: int = 10,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        drop_last: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, img_size=img_size, in_chans=in_chans,
                         num_classes=num_classes, seed=seed, num_workers=num_workers,
                         drop_last=drop_last)
        self.require_in_chans((1, 3), "digits are grey images: use 1, or 3 to repeat the "
                              "channel")
        self.require_num_classes("digits", self.NUM_CLASSES)
        self.val_fraction = check_float("val_fraction", val_fraction, 0.0, 1.0, low_open=True)
        self.test_fraction = check_float("test_fraction", test_fraction, 0.0, 1.0, low_open=True)
        n = self.NUM_IMAGES
        self.num_val = round(self.val_fraction * n)
        self.num_test = round(self.test_fraction * n)
        if self.num_val < 1 or self.num_test < 1 or self.num_val + self.num_test >= n:
            raise DataConfigError(f"data.val_fraction: {val_fraction} with test_fraction "
                                  f"{test_fraction} leaves no image in some split of {n}")
        self.split_indices: dict[str, torch.Tensor] = {}
        self.mean: float | None = None
        self.std: float | None = None

    def setup(self, stage: str | None = None) -> None:
        if not self.tensors:
            self._make_tensors()
        self.check_train_batches(stage)

    def _make_tensors(self) -> None:
        from sklearn.datasets import load_digits  # heavy: only the digits data needs sklearn

        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.as_tensor(digits.target, dtype=torch.int64)
        found = int(y.max()) + 1
        if len(x) != self.NUM_IMAGES or found != self.num_classes:
            raise DataConfigError(f"data.num_classes: expected {self.num_classes} classes in "
                                  f"{self.NUM_IMAGES} digits, found {found} in {len(x)}")
        if self.img_size != self.NATIVE_SIZE:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear",
                              align_corners=False, antialias=False)
        perm = split_permutation(len(x))
        self.split_indices = {
            "test": perm[:self.num_test],
            "val": perm[self.num_test:self.num_test + self.num_val],
            "train": perm[self.num_test + self.num_val:],
        }
        train_x = x[self.split_indices["train"]]
        mean, std = train_x.mean(), train_x.std()
        x = (x - mean) / std
        if self.in_chans == 3:
            x = x.repeat(1, 3, 1, 1)
        self.mean, self.std = float(mean), float(std)
        self.tensors = {k: (x[i].contiguous(), y[i]) for k, i in self.split_indices.items()}
        self._num_train_samples = len(self.split_indices["train"])
