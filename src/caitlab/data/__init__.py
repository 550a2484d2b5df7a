"""Lightning data modules, one per dataset, each built by Hydra from ``conf/data/<name>.yaml``.

Every module takes explicit keyword arguments (``batch_size``, ``img_size``, ``in_chans``,
``num_classes``, ``seed``, ...) and checks in ``__init__``, before any training, that the data
really has ``in_chans`` channels and ``num_classes`` classes: an inconsistent override raises
:class:`DataConfigError` with one line naming the key (``data.num_classes: ...``) or the path.
The training code reads ``dm.num_classes``, ``dm.in_chans``, ``dm.img_size`` uniformly, and
``dm.num_train_samples`` after ``setup``; ``dm.describe()`` returns all of them as a dict.

Two kinds of loaders:

* In memory (:class:`DigitsDataModule`, :class:`SyntheticDataModule`): the whole split is one
  tensor, and :class:`TensorBatches` yields ``(x[idx], y[idx])`` slices of a permutation -- no
  per-sample ``__getitem__`` + collate, no workers (``num_workers`` is accepted for a uniform
  config and ignored). The training permutation is drawn from ``torch.Generator`` seeded with
  ``seed + epoch``, the epoch read from the trainer when the epoch starts, so a run resumed at
  epoch ``e`` sees exactly the batches an uninterrupted run sees at epoch ``e``. Lightning
  passes such an iterable through untouched (it only injects a ``DistributedSampler`` into a
  real ``DataLoader``), so DDP sharding is done here: see :func:`shard_indices`.
* Files (:class:`Cifar10DataModule`, :class:`Cifar100DataModule`,
  :class:`ImageFolderDataModule`): ordinary ``DataLoader``\\ s with workers; Lightning injects
  the ``DistributedSampler`` under DDP. ``num_workers: auto`` is one fewer than the CPUs of the
  rank (:func:`caitlab.cpus.available_cpus`: affinity mask, ``SLURM_CPUS_PER_TASK``), and a
  count above them is capped, said once.

Every module refuses in ``setup('fit')`` a training split that makes no batch under
``drop_last`` (per rank under DDP), instead of an epoch that trains nothing.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from caitlab.cpus import available_cpus

log = logging.getLogger(__name__)

#: Seed of the fixed train/val(/test) split permutations. Deliberately independent of the run
#: seed, so that runs with different seeds are compared on the same held-out images.
SPLIT_SEED = 0

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

ON_CORRUPT = ("stop", "skip")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")


class DataConfigError(ValueError):
    """A data config that cannot work; the one-line message names ``data.<key>`` or the path."""


class ImageReadError(DataConfigError):
    """Reading or transforming one image raised (not for a corrupt file: ``on_corrupt``); the
    one line names the file and the cause, the traceback is worth keeping."""


def data_error_message(err: DataConfigError) -> str:
    """``err``'s one line, also when a DataLoader worker raised it: torch re-raises a worker's
    error in the main process with the worker's whole traceback as the message, and the
    original message as its last line."""
    text = str(err).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    name = f"{type(err).__module__}.{type(err).__name__}: "
    return last.removeprefix(name)


# --------------------------------------------------------------------------------------------
# argument checks


def _int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise DataConfigError(f"data.{key}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _float(key: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise DataConfigError(f"data.{key}: must be a number in {bracket}{low}, {high}], "
                              f"got {value!r}")
    return value


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _workers(value: Any) -> int | str:
    """``num_workers``: an integer >= 0, or ``auto`` (see :func:`loader_workers`)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise DataConfigError(f"data.num_workers: must be an integer >= 0 or auto, "
                              f"got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------
# loader workers


def loader_workers(requested: int | str, cpus: int) -> tuple[int, str | None]:
    """Workers per DataLoader for ``requested`` (an integer or ``auto``) given ``cpus`` for this
    process, and the one line to say about it (None: nothing worth saying).

    ``auto`` is ``cpus - 1``: the main process, which collates and feeds the model, keeps a
    CPU. More workers than CPUs only compete with each other and the main process for them
    (and each holds a copy of the dataset's file list), so an explicit count is capped at
    ``cpus``.
    """
    if requested == "auto":
        return max(0, cpus - 1), None
    if requested > cpus:
        return cpus, (f"data.num_workers={requested} but this process has {cpus} CPU"
                      f"{'s' if cpus != 1 else ''}: using {cpus} loader worker"
                      f"{'s' if cpus != 1 else ''} (data.num_workers=auto follows the CPUs)")
    return int(requested), None


# --------------------------------------------------------------------------------------------
# in-memory batches and DDP sharding


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_indices(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's strided share of ``indices``, the same length on every rank.

    As ``torch.utils.data.DistributedSampler`` (``drop_last=False``) does: the index list is
    padded by repeating it from its start up to a multiple of ``world_size`` (at most
    ``world_size - 1`` duplicates; nothing is dropped), then rank ``r`` takes
    ``indices[r::world_size]``. Every rank therefore gets ``ceil(n / world_size)`` indices, and
    the shares are disjoint except for those few repeats. For validation this means a handful
    of samples may count twice in a DDP metric -- the same as Lightning's own sampler.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
    n = len(indices)
    if world_size == 1 or n == 0:
        return indices
    total = math.ceil(n / world_size) * world_size
    if total > n:
        indices = indices.repeat(math.ceil(total / n))[:total]
    return indices[rank:total:world_size]


class TensorBatches:
    """Batches ``(x[idx], y[idx])`` sliced from in-memory tensors; a Lightning dataloader.

    ``shuffle``: permute with a ``torch.Generator`` seeded by ``seed + epoch_fn()``, read once
    per ``iter()``; otherwise the stored order. ``drop_last``: drop an incomplete last batch.
    Under DDP (``torch.distributed`` initialised, or explicit ``rank``/``world_size``) each rank
    iterates its :func:`shard_indices` share of the permutation; every rank has the same
    ``len()``.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch_fn: Callable[[], int] | None = None,
        skip_fn: Callable[[], int] | None = None,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch_fn = epoch_fn
        self.skip_fn = skip_fn
        self.drop_last = drop_last
        self._rank, self._world_size = rank, world_size

    def rank_world(self) -> tuple[int, int]:
        if self._rank is not None and self._world_size is not None:
            return self._rank, self._world_size
        return dist_rank_world()

    @property
    def num_samples(self) -> int:
        """Samples this rank iterates per epoch, before ``drop_last``."""
        _, world = self.rank_world()
        return math.ceil(len(self.x) / world)

    def __len__(self) -> int:
        m = self.num_samples
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's sample order for ``epoch`` (default: ``epoch_fn()``, or 0)."""
        n = len(self.x)
        if self.shuffle:
            if epoch is None:
                epoch = int(self.epoch_fn()) if self.epoch_fn is not None else 0
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        return shard_indices(order, *self.rank_world())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices()
        bs = self.batch_size
        # A run resumed mid-epoch continues with the batches it had not trained on yet.
        skip = int(self.skip_fn()) if self.skip_fn is not None else 0
        for b in range(skip, len(self)):
            sel = idx[b * bs:(b + 1) * bs]
            yield self.x[sel], self.y[sel]


# --------------------------------------------------------------------------------------------
# common base


class _BaseDataModule(LightningDataModule):
    """Checked common arguments, the uniform properties and ``describe()``."""

    def __init__(
        self,
        *,
        batch_size: int,
        img_size: int,
        in_chans: int,
        num_classes: int,
        seed: int,
        num_workers: int | str,
        drop_last: bool,
    ) -> None:
        super().__init__()
        # plain attribute, so Lightning's batch-size finder can change it
        self.batch_size = _int("batch_size", batch_size, 1)
        self._img_size = _int("img_size", img_size, 1)
        self._in_chans = _int("in_chans", in_chans, 1)
        self._num_classes = _int("num_classes", num_classes, 1)
        self.seed = _int("seed", seed, -(2**63))
        self.num_workers = _workers(num_workers)
        self.drop_last = bool(drop_last)
        self._num_train_samples: int | None = None
        self._loader_workers: int | None = None

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def in_chans(self) -> int:
        return self._in_chans

    @property
    def img_size(self) -> int:
        return self._img_size

    @property
    def num_train_samples(self) -> int:
        """Training images per epoch (all ranks together); known after ``setup('fit')``."""
        if self._num_train_samples is None:
            raise RuntimeError(f"{type(self).__name__}.num_train_samples is known only after "
                               "setup('fit')")
        return self._num_train_samples

    def describe(self) -> dict[str, Any]:
        """The uniform facts; ``num_train_samples`` is None before ``setup``."""
        return {
            "datamodule": type(self).__name__,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "img_size": self.img_size,
            "batch_size": self.batch_size,
            "num_train_samples": self._num_train_samples,
        }

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return dist_rank_world()

    def _processes_per_node(self) -> int:
        """Ranks sharing this machine's CPUs: under SLURM each task has its own CPUs."""
        if os.environ.get("SLURM_CPUS_PER_TASK"):
            return 1
        local = os.environ.get("LOCAL_WORLD_SIZE", "")
        if local.isdigit() and int(local) > 0:
            return int(local)
        trainer = self.trainer
        return max(1, int(getattr(trainer, "num_devices", 1))) if trainer is not None else 1

    def loader_workers(self) -> int:
        """``num_workers`` resolved against the CPUs this rank has (:func:`loader_workers`);
        decided, and said if capped, once: at the first loader."""
        if self._loader_workers is None:
            cpus = max(1, available_cpus() // self._processes_per_node())
            self._loader_workers, note = loader_workers(self.num_workers, cpus)
            if note is not None and self._rank_world()[0] == 0:
                log.warning(note)
        return self._loader_workers

    def check_train_batches(self, num_train: int) -> None:
        """Refuses, before any training, a split too small for one batch under ``drop_last``.

        Each rank iterates ``ceil(n / world_size)`` samples (DistributedSampler and
        :func:`shard_indices` pad), and ``drop_last`` drops its incomplete last batch; an
        epoch of no batches would train nothing and still report a test accuracy.
        """
        _, world = self._rank_world()
        per_rank = math.ceil(num_train / world)
        if not self.drop_last or per_rank >= self.batch_size:
            return
        counts = f"{num_train} training images"
        if world > 1:
            counts += f" ({per_rank} per rank on {world} ranks)"
        raise DataConfigError(
            f"data: {counts} make no batch of data.batch_size={self.batch_size} with "
            f"data.drop_last=true; set data.batch_size={per_rank} or lower, or "
            "data.drop_last=false")

    def _file_loader(self, ds: Dataset | None, train: bool) -> DataLoader:
        """A per-sample DataLoader; Lightning injects its DistributedSampler under DDP."""
        if ds is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() first")
        gen = torch.Generator().manual_seed(self.seed) if train else None
        workers = self.loader_workers()
        return DataLoader(ds, batch_size=self.batch_size, shuffle=train, generator=gen,
                          drop_last=train and self.drop_last,
                          num_workers=workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=workers > 0)

    def current_epoch(self) -> int:
        """The trainer's epoch (0 without a trainer); seeds the in-memory shuffles."""
        return self.trainer.current_epoch if self.trainer is not None else 0

    def batches_done(self) -> int:
        """Batches of the current epoch already trained when resuming from a mid-epoch
        checkpoint (a preempted or interrupted run); 0 otherwise."""
        fit_loop = getattr(self.trainer, "fit_loop", None)
        if fit_loop is None or not fit_loop.restarting:
            return 0
        return int(fit_loop.epoch_loop.batch_progress.current.completed)


class _InMemoryDataModule(_BaseDataModule):
    """Splits held as tensors in ``self.tensors[split] = (x, y)``, served by TensorBatches."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _batches(self, split: str, train: bool) -> TensorBatches:
        if split not in self.tensors:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for the "
                               f"{split} dataloader")
        x, y = self.tensors[split]
        return TensorBatches(x, y, self.batch_size, shuffle=train, seed=self.seed,
                             epoch_fn=self.current_epoch,
                             skip_fn=self.batches_done if train else None,
                             drop_last=train and self.drop_last)

    def train_dataloader(self) -> TensorBatches:
        return self._batches("train", train=True)

    def val_dataloader(self) -> TensorBatches:
        return self._batches("val", train=False)

    def test_dataloader(self) -> TensorBatches:
        return self._batches("test", train=False)


# --------------------------------------------------------------------------------------------
# digits


class DigitsDataModule(_InMemoryDataModule):
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes): a CPU-sized benchmark.

    Pixels 0..16 are scaled to [0, 1], optionally resized (bilinear) to ``img_size`` and
    repeated to 3 channels, then normalised with the training split's scalar mean and std.
    The split (``test_fraction`` / ``val_fraction`` / rest for training) is one fixed
    permutation (:data:`SPLIT_SEED`), identical for every run seed.
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
        if self.in_chans not in (1, 3):
            raise DataConfigError(f"data.in_chans: digits are grey images: use 1, or 3 to "
                                  f"repeat the channel, got {in_chans}")
        if self.num_classes != self.NUM_CLASSES:
            raise DataConfigError(f"data.num_classes: digits has {self.NUM_CLASSES} classes, "
                                  f"got {num_classes}")
        self.val_fraction = _float("val_fraction", val_fraction, 0.0, 1.0, low_open=True)
        self.test_fraction = _float("test_fraction", test_fraction, 0.0, 1.0, low_open=True)
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
        if stage in (None, "fit"):
            self.check_train_batches(self.num_train_samples)

    def _make_tensors(self) -> None:
        from sklearn.datasets import load_digits

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
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
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


# --------------------------------------------------------------------------------------------
# synthetic


class SyntheticDataModule(_InMemoryDataModule):
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
            "train": _int("num_train", num_train, 1),
            "val": _int("num_val", num_val, 1),
            "test": _int("num_test", num_test, 1),
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
        if stage in (None, "fit"):
            self.check_train_batches(self.num_train_samples)


# --------------------------------------------------------------------------------------------
# CIFAR


class _CifarDataModule(_BaseDataModule):
    """torchvision CIFAR; ``val_fraction`` of the training set is held out for validation.

    The held-out split is a fixed permutation (:data:`SPLIT_SEED`); the test set is the
    official one. ``val_fraction=0`` trains on all 50k images and validates on the test set.
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
        if self.in_chans != 3:
            raise DataConfigError(f"data.in_chans: {self.dataset_name} images have 3 channels, "
                                  f"got {in_chans}")
        if self.num_classes != self.default_num_classes:
            raise DataConfigError(f"data.num_classes: {self.dataset_name} has "
                                  f"{self.default_num_classes} classes, got {num_classes}")
        self.val_fraction = _float("val_fraction", val_fraction, 0.0, 0.9)
        self.root = Path(root).expanduser()
        self.download = bool(download)
        if not self.download:
            self._check_files()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def dataset_cls(self) -> type:
        import torchvision.datasets

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
        from torchvision import transforms as T

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

    def _load(self, train: bool) -> Dataset:
        try:
            ds = self.dataset_cls(str(self.root), train=train, transform=self.transform(train))
        except RuntimeError as e:
            raise DataConfigError(f"data.root: {self.root / self.dataset_cls.base_folder} is "
                                  f"missing or corrupted ({_one_line(e)}); delete it and set "
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
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
            self.train_set = Subset(full, perm[n_val:].tolist())
            if n_val:
                # same images in memory, eval transform
                eval_full = copy.copy(full)
                eval_full.transform = self.transform(train=False)
                eval_full.transforms = type(full.transforms)(eval_full.transform, None)
                self.val_set = Subset(eval_full, perm[:n_val].tolist())
            self._num_train_samples = len(self.train_set)
        if stage in (None, "fit"):
            self.check_train_batches(self.num_train_samples)
        need_test = stage in (None, "test", "predict") or (
            stage in ("fit", "validate") and self.val_set is None)
        if need_test and self.test_set is None:
            self.test_set = self._load(train=False)
        if self.val_set is None and self.test_set is not None:
            self.val_set = self.test_set  # val_fraction == 0


    def train_dataloader(self) -> DataLoader:
        return self._file_loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._file_loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._file_loader(self.test_set, train=False)


class Cifar10DataModule(_CifarDataModule):
    __doc__ = _CifarDataModule.__doc__
    dataset_name = "CIFAR-10"
    dataset_cls_name = "CIFAR10"
    default_num_classes = 10
    mean, std = CIFAR10_MEAN, CIFAR10_STD


class Cifar100DataModule(_CifarDataModule):
    __doc__ = _CifarDataModule.__doc__
    dataset_name = "CIFAR-100"
    dataset_cls_name = "CIFAR100"
    default_num_classes = 100
    mean, std = CIFAR100_MEAN, CIFAR100_STD


# --------------------------------------------------------------------------------------------
# image folders (ImageNet layout)


def find_class_folders(directory: str | Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders (``.ipynb_checkpoints`` is no class)."""
    return sorted(p.name for p in Path(directory).iterdir()
                  if p.is_dir() and not p.name.startswith("."))


# What PIL raises for a file it cannot decode (UnidentifiedImageError and truncated files are
# OSErrors; some broken headers raise SyntaxError or ValueError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_rgb(path: str) -> Image.Image:
    """torchvision's loader, but high-bit-depth images keep their contrast: Pillow's
    ``convert("RGB")`` clips 16-bit and 32-bit values at 255, so a 16-bit scan comes out
    all white. Such images are rescaled to 8 bits first: 16-bit ranges by 1/257, others
    (float, 32-bit int) from their own minimum and maximum."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64)
        low, high = float(a.min()), float(a.max())
        if img.mode.startswith("I;16") or (img.mode == "I" and low >= 0 and high <= 65535
                                           and high > 255):
            a = a / 257.0
        elif img.mode == "F" and low >= 0 and high <= 1:
            a = a * 255.0
        elif high > 255 or low < 0:
            a = (a - low) * (255.0 / (high - low)) if high > low else a * 0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def _reason(err: BaseException) -> str:
    return _one_line(f"{type(err).__name__}: {err}")


def _image_folder_cls() -> type:
    from torchvision.datasets import ImageFolder

    class CheckedImageFolder(ImageFolder):
        """ImageFolder without hidden class folders and with an ``on_corrupt`` policy.

        ``stop``: a file that cannot be decoded raises :class:`DataConfigError` naming it.
        ``skip``: it is logged (once per file and process) and the next decodable sample in
        the index order is returned instead, so a batch keeps its size and shapes.
        Any other error reading or transforming a file raises :class:`ImageReadError` with
        the file and the cause in its one line: inside a DataLoader worker torch would
        otherwise show only ``Caught ValueError in DataLoader worker process 1``.
        """

        def __init__(self, root: str, transform: Callable | None, on_corrupt: str) -> None:
            self.on_corrupt = on_corrupt
            self.skipped: set[str] = set()
            super().__init__(root, transform=transform, loader=load_rgb)

        def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
            classes = find_class_folders(directory)
            if not classes:
                raise FileNotFoundError(f"no class folders under {directory}")
            return classes, {c: i for i, c in enumerate(classes)}

        def __getitem__(self, index: int) -> tuple[Any, int]:
            n = len(self.samples)
            for attempt in range(n):
                path, target = self.samples[(index + attempt) % n]
                try:
                    sample = self.loader(path)
                except _DECODE_ERRORS as e:
                    reason = _reason(e)
                    if self.on_corrupt == "stop":
                        raise DataConfigError(
                            f"data.root: cannot decode image {path} ({reason}); fix or remove "
                            "it, or set data.on_corrupt=skip") from e
                    if path not in self.skipped:
                        self.skipped.add(path)
                        log.warning("data.on_corrupt=skip: skipping undecodable image %s (%s)",
                                    path, reason)
                    continue
                except Exception as e:
                    raise ImageReadError(f"data: reading image {path} failed ({_reason(e)})"
                                         ) from e
                try:
                    if self.transform is not None:
                        sample = self.transform(sample)
                    if self.target_transform is not None:
                        target = self.target_transform(target)
                except Exception as e:
                    raise ImageReadError(f"data: the transform failed on image {path} "
                                         f"({_reason(e)})") from e
                return sample, target
            raise DataConfigError(f"data.root: no image under {self.root} can be decoded")

    return CheckedImageFolder


class ImageFolderDataModule(_BaseDataModule):
    """ImageNet layout: ``root/train/<class>/*`` and ``root/val/<class>/*``.

    ImageNet has no labelled test set, so the test split *is* the val split
    (``test_dataloader`` returns the val images). Class indices follow the sorted folder names
    (hidden folders ignored); ``val/`` must have the same class folders as ``train/``.
    Transforms are timm's (DeiT/CaiT recipe): training ``create_transform(is_training=True,
    auto_augment, re_prob=reprob, interpolation, color_jitter)`` -- note that timm ignores
    ``color_jitter`` when a RandAugment policy is set, as in DeiT -- and evaluation
    ``create_transform(is_training=False, crop_pct, interpolation)`` (CaiT evaluates at
    ``crop_pct=1.0``). ``on_corrupt``: ``stop`` or ``skip`` an image PIL cannot decode.
    timm's posterize op is guarded (:mod:`caitlab.data.augment`) so that no RandAugment draw
    raises; an ``img_size`` that would shrink photographs to a toy size is refused
    (:meth:`_check_img_size`).
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
        interpolation: str = "bicubic",
        color_jitter: float | None = 0.3,
        seed: int = 0,
        drop_last: bool = True,
        on_corrupt: str = "stop",
    ) -> None:
        super().__init__(batch_size=batch_size, img_size=img_size, in_chans=in_chans,
                         num_classes=num_classes, seed=seed, num_workers=num_workers,
                         drop_last=drop_last)
        if on_corrupt not in ON_CORRUPT:
            raise DataConfigError(f"data.on_corrupt: must be one of {', '.join(ON_CORRUPT)}, "
                                  f"got {on_corrupt!r}")
        if self.in_chans != 3:
            raise DataConfigError(f"data.in_chans: image folders are read as RGB (3 channels), "
                                  f"got {in_chans}")
        if interpolation not in INTERPOLATIONS:
            raise DataConfigError(f"data.interpolation: must be one of "
                                  f"{', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        self.on_corrupt = on_corrupt
        self.interpolation = interpolation
        self.crop_pct = _float("crop_pct", crop_pct, 0.0, 1.0, low_open=True)
        self.reprob = _float("reprob", reprob, 0.0, 1.0)
        if color_jitter is not None:
            color_jitter = _float("color_jitter", color_jitter, 0.0, 1e9)
        self.color_jitter = color_jitter
        if auto_augment is not None and str(auto_augment).lower() in ("", "none"):
            auto_augment = None
        self.auto_augment = auto_augment
        self.root = Path(root).expanduser()
        self.classes = self._check_folders()
        self._check_img_size()
        self.train_transform, self.eval_transform = self._transforms()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

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
        from torchvision.datasets.folder import IMG_EXTENSIONS

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
                    except _DECODE_ERRORS:
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
        from timm.data import create_transform

        from caitlab.data.augment import guard_augment_ops

        try:
            train = create_transform(input_size=self.img_size, is_training=True,
                                     auto_augment=self.auto_augment, re_prob=self.reprob,
                                     interpolation=self.interpolation,
                                     color_jitter=self.color_jitter)
        except (AssertionError, ValueError, KeyError) as e:
            raise DataConfigError(f"data.auto_augment: {self.auto_augment!r} is not a timm "
                                  f"augmentation policy ({_one_line(e)})") from e
        guard_augment_ops(train)
        evaluation = create_transform(input_size=self.img_size, is_training=False,
                                      crop_pct=self.crop_pct, interpolation=self.interpolation)
        return train, evaluation

    def _load(self, split: str, transform: Callable) -> Dataset:
        try:
            return _image_folder_cls()(str(self.root / split), transform, self.on_corrupt)
        except FileNotFoundError as e:
            raise DataConfigError(f"data.root: {_one_line(e)}") from e

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._load("train", self.train_transform)
            self._num_train_samples = len(self.train_set)
        if stage in (None, "fit"):
            self.check_train_batches(self.num_train_samples)
        if self.val_set is None:
            self.val_set = self._load("val", self.eval_transform)


    def train_dataloader(self) -> DataLoader:
        return self._file_loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._file_loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        """The val images: ImageNet has no labelled test set."""
        return self._file_loader(self.val_set, train=False)
