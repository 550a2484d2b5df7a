"""Random images and labels, made in memory: the throughput benchmark's data."""

from __future__ import annotations

import numpy as np
import torch

from caitlab.data.base import InMemoryDataModule
from caitlab.data.errors import check_int


class SyntheticDataModule(InMemoryDataModule):
    """Random-normal float32 images and uniform random labels, for throughput benchmarks.

    Each split has its own generator derived from ``(seed, split)``, so a split's content does
    not depend on which other splits were generated; tensors are made lazily in ``setup`` for
    the splits the stage needs (fit: train + val, validate: val, test: test, None: all).
    """

    SPLITS = ("train", "val", "test")

    def __init__(
        self,
        batch_size: int = 32,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        num_train: int = 512,
        num_val: int = 64,
        num_test: int = 64,
        seed: int = 0,
        drop_last: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, img_size=img_size, in_chans=in_chans,
                         num_classes=num_classes, seed=seed, num_workers=num_workers,
                         drop_last=drop_last)
        self.split_sizes = {
            "train": check_int("num_train", num_train, 1),
            "val": check_int("num_val", num_val, 1),
            "test": check_int("num_test", num_test, 1),
        }

    def _generate(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        state = np.random.SeedSequence([self.seed % 2**63, self.SPLITS.index(split)])
        gen = torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0] >> 1))
        n, c, s = self.split_sizes[split], self.in_chans, self.img_size
        x = torch.randn(n, c, s, s, generator=gen, dtype=torch.float32)
        y = torch.randint(0, self.num_classes, (n,), generator=gen, dtype=torch.int64)
        return x, y

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",),
                  "predict": ("test",)}.get(stage or "", self.SPLITS)
        for split in wanted:
            if split not in self.tensors:
                self.tensors[split] = self._generate(split)
        self._num_train_samples = self.split_sizes["train"]
        self.check_train_batches(stage)
