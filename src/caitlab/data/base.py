"""What every data module shares: the checked common arguments, the uniform properties, the
fixed split order, loader workers and the refusal of a split too small for one batch; and the
two ways of serving batches, in memory (:class:`InMemoryDataModule`) or from files
(:class:`FileDataModule`), each of which a run stopped mid-epoch resumes at its next batch."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from caitlab import compat
from caitlab.cpus import available_cpus
from caitlab.data.errors import DataConfigError, check_int, check_workers
from caitlab.data.sampling import (
    ResumableSampler,
    ShuffleSampler,
    TensorBatches,
    dist_rank_world,
)

log = logging.getLogger(__name__)

#: Seed of the fixed train/val(/test) split permutations. Deliberately independent of the run
#: seed, so that runs with different seeds are compared on the same held-out images.
SPLIT_SEED = 0


def split_permutation(n: int) -> torch.Tensor:
    """The fixed order of ``n`` images that held-out and training splits are cut from."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))


def selection_facts(split: str, test_is_val: bool) -> dict[str, Any]:
    """The summary's ``selection``: which images choose ``best.ckpt`` and which checkpoint
    ``test/top1`` scores.

    Args:
        split: what the validation split is, in words (``held out 10% of train``, ``val``).
        test_is_val: whether the test split is that same split (no images apart from the
            test images to choose on).

    Returns:
        ``{"split", "scored", "test_is_selection"}``. A checkpoint chosen as the best of
        several on some images scores above its worth on those images, the more so the
        noisier a variant's epochs: where the test split is the validation split, the last
        checkpoint is scored (it was chosen by nothing), so ``test_is_selection`` (the
        number was measured on the images that chose its checkpoint) is false either way.
    """
    return {"split": split, "scored": "last" if test_is_val else "best",
            "test_is_selection": False}


def held_out_words(fraction: float, source: str) -> str:
    """``held out 5% of train/``: a held-out validation split in the summary's words."""
    return f"held out {100 * fraction:g}% of {source}"



def loader_workers(requested: int | Literal["auto"], cpus: int) -> tuple[int, str | None]:
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



class DataModuleBase(LightningDataModule):
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
        self.batch_size = check_int("batch_size", batch_size, 1)
        self._img_size = check_int("img_size", img_size, 1)
        self._in_chans = check_int("in_chans", in_chans, 1)
        self._num_classes = check_int("num_classes", num_classes, 1)
        self.seed = check_int("seed", seed, -(2**63))
        self.num_workers = check_workers(num_workers)
        self.drop_last = bool(drop_last)
        self._num_train_samples: int | None = None
        self._loader_workers: int | None = None

    def require_num_classes(self, dataset: str, classes: int) -> None:
        """Refuses a ``num_classes`` other than the ``classes`` that ``dataset`` has."""
        if self.num_classes != classes:
            raise DataConfigError(f"data.num_classes: {dataset} has {classes} classes, "
                                  f"got {self.num_classes}")

    def require_in_chans(self, allowed: tuple[int, ...], why: str) -> None:
        """Refuses an ``in_chans`` not in ``allowed``; ``why`` says what the images are."""
        if self.in_chans not in allowed:
            raise DataConfigError(f"data.in_chans: {why}, got {self.in_chans}")

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

    def selection(self) -> dict[str, Any]:
        """Which split chooses the checkpoint and which checkpoint is scored
        (:func:`selection_facts`); here a validation split apart from the test split, as a
        module with its own test images has. A module whose test split is its validation
        split says so by overriding this."""
        return selection_facts("val", test_is_val=False)

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

    def check_train_batches(self, stage: str | None) -> None:
        """Refuses, before any training, a split too small for one batch under ``drop_last``;
        called by ``setup(stage)`` once the training split is known, and checks only for the
        stages that train (``fit``, or None: all).

        Each rank iterates ``ceil(n / world_size)`` samples (DistributedSampler and
        :func:`shard_indices` pad), and ``drop_last`` drops its incomplete last batch; an
        epoch of no batches would train nothing and still report a test accuracy.
        """
        if stage not in (None, "fit"):
            return
        num_train = self.num_train_samples
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


class InMemoryDataModule(DataModuleBase):
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


class LoaderRecord:
    """What a :class:`ResumableLoader` keeps, shared with the copies Lightning makes of it
    (under DDP it makes the evaluation loaders anew, with a DistributedSampler in, from the
    arguments they were made with): the batches handed out this iteration (``batches_out``),
    the iterations (``iterations``), and ``seed_from``, a generator the next iterator draws
    its workers' base seed from instead of the global RNG."""

    def __init__(self) -> None:
        self.batches_out = 0
        self.iterations = 0
        self.seed_from: torch.Generator | None = None


class ResumableLoader(DataLoader):
    """A DataLoader that keeps a :class:`LoaderRecord` of its iterations.

    A loader without a generator draws its workers' base seed from the global RNG, once per
    iterator it makes. A resumed run gives ``record.seed_from`` to a loader whose draw the
    stopped run had made already (:meth:`seed_drawn`): the checkpoint restored the global RNG
    to after that draw, and a second one would shift every draw of the run after it.
    """

    def __init__(self, *args: Any, record: LoaderRecord | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.record = record if record is not None else LoaderRecord()

    def __iter__(self) -> Any:  # a map over DataLoader's iterator (the type it declares)
        record = self.record
        record.batches_out = 0
        record.iterations += 1
        if record.seed_from is None or self.generator is not None:
            return map(self._count, super().__iter__())
        self.generator, record.seed_from = record.seed_from, None
        try:
            return map(self._count, super().__iter__())
        finally:
            self.generator = None

    def _count(self, batch: Any) -> Any:
        self.record.batches_out += 1
        return batch

    def seed_drawn(self, in_progress: bool) -> bool:
        """Whether this run has drawn from the global RNG the workers' seed that a resumed
        run's first iterator of this loader would draw: with persistent workers, once it has
        made an iterator (it makes no other); otherwise for an iteration still in progress
        (``in_progress``)."""
        if self.generator is not None:
            return False
        return self.record.iterations > 0 if self.persistent_workers else in_progress


class FileDataModule(DataModuleBase):
    """Splits held as map-style datasets ``train_set``, ``val_set``, ``test_set`` (set by
    ``setup``), served by per-sample DataLoaders with workers.

    A stop mid-epoch resumes at the next batch of the same order: ``state_dict()`` (which
    Lightning saves in every checkpoint) holds the training sampler's position, and
    ``load_state_dict()`` hands it to the next training loader (:class:`ResumableSampler`),
    the epoch's end included: the next epoch then draws the order it would have.
    """

    test_set: Dataset | None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._loaders: dict[str, ResumableLoader] = {}
        self._resume: dict[str, Any] = {}

    def _file_loader(self, ds: Dataset | None, split: str) -> DataLoader:
        """A per-sample DataLoader with workers."""
        if ds is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() first")
        train = split == "train"
        workers = self.loader_workers()
        sampler, gen = None, None
        if train:
            sampler = self.train_sampler(ds)
            if sampler is None:
                sampler = self.shuffle_sampler(ds, persistent_workers=workers > 0)
                # the workers' base seed comes from this generator, as it always has; the
                # sampler draws what RandomSampler drew from it, on a generator of its own
                gen = torch.Generator().manual_seed(self.seed)
            if "train" in self._resume:
                sampler.resume_from(self._resume.pop("train"))
        loader = ResumableLoader(ds, batch_size=self.batch_size, sampler=sampler, generator=gen,
                                 drop_last=train and self.drop_last,
                                 collate_fn=self.collate_fn(train), num_workers=workers,
                                 pin_memory=torch.cuda.is_available(),
                                 persistent_workers=workers > 0, record=LoaderRecord())
        if self._resume.pop(f"{split}_seed_drawn", False):
            loader.record.seed_from = torch.Generator().manual_seed(self.seed)
        self._loaders[split] = loader
        return loader

    def collate_fn(self, train: bool) -> Callable[[list[Any]], Any] | None:
        """The loader's collate function (None: PyTorch's default)."""
        return None

    def train_sampler(self, ds: Dataset) -> ResumableSampler | None:
        """The training loader's sampler (None: :meth:`shuffle_sampler`'s)."""
        return None

    def shuffle_sampler(self, ds: Dataset, persistent_workers: bool) -> ShuffleSampler:
        """A new order every epoch: under a strategy that shards the data (DDP), Lightning's
        DistributedSampler's; otherwise a seeded shuffle (:class:`ShuffleSampler`)."""
        rank, world = self._rank_world()
        return ShuffleSampler(ds, num_replicas=world, rank=rank, seed=self.seed,
                              batch_size=self.batch_size, drop_last=self.drop_last,
                              shard=self._shards_data(world),
                              loader_draws_every_epoch=not persistent_workers)

    def _shards_data(self, world: int) -> bool:
        """Whether Lightning would shard the training images: under a distributed strategy
        (even on one device) unless ``use_distributed_sampler`` is off; without a trainer,
        when several processes train."""
        shards = compat.shards_training_data(self.trainer)
        return world > 1 if shards is None else shards

    def train_position(self) -> tuple[int, bool]:
        """``(batches, finished)``: batches of the current epoch trained, and whether the
        epoch is over. Under a trainer its loop's count (its fetcher takes a batch ahead of
        the one training); without one, the batches the training loader handed out."""
        trainer = self.trainer
        if trainer is not None and (loop := getattr(trainer, "fit_loop", None)) is not None:
            done = int(loop.epoch_loop.batch_progress.current.processed)
            return done, done >= trainer.num_training_batches
        loader = self._loaders["train"]
        sampler = loader.sampler
        assert isinstance(sampler, ResumableSampler)  # every training loader's (_file_loader)
        done = loader.record.batches_out
        return done, done >= sampler.batches_per_epoch()

    def state_dict(self) -> dict[str, Any]:
        """The training sampler's position, and which loaders' workers' seeds the run has
        drawn (:meth:`ResumableLoader.seed_drawn`); empty before a training loader exists."""
        loader = self._loaders.get("train")
        if loader is None or not isinstance(loader.sampler, ResumableSampler):
            return {}
        batches, finished = self.train_position()
        train = loader.sampler.position(batches, finished)
        state: dict[str, Any] = {"train": train}
        in_progress = {"train": train["started"]}
        for split, split_loader in self._loaders.items():
            state[f"{split}_seed_drawn"] = split_loader.seed_drawn(in_progress.get(split, False))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """For the loaders made next (Lightning restores a checkpoint before it asks for
        them)."""
        self._resume = dict(state)

    def train_dataloader(self) -> DataLoader:
        return self._file_loader(self.train_set, "train")

    def val_dataloader(self) -> DataLoader:
        return self._file_loader(self.val_set, "val")

    def test_dataloader(self) -> DataLoader:
        return self._file_loader(self.test_set, "test")
