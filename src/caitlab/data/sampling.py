"""Training orders: in-memory batches drawn in a seeded per-epoch order, and the samplers of
the file datasets' loaders, each of which can stop after any batch and continue there.

Lightning passes an iterable that is not a ``DataLoader`` through untouched (it injects a
``DistributedSampler`` only into a real ``DataLoader``), so :class:`TensorBatches` shards for
itself, the way that sampler does: :func:`shard_indices`. The file datasets' samplers are
``DistributedSampler``\\ s (:class:`ResumableSampler`), which Lightning leaves in place.
"""

from __future__ import annotations

import logging
import math
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Iterator, Sized
from typing import Any, cast

import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import Dataset, DistributedSampler

log = logging.getLogger(__name__)


def num_images(dataset: Dataset) -> int:
    """``len(dataset)``: every dataset caitlab loads or samples is map-style, with a length
    (torch types ``Dataset`` without ``__len__``, which its own samplers call regardless)."""
    return len(cast(Sized, dataset))


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



class ResumableSampler(DistributedSampler, metaclass=ABCMeta):
    """A training sampler whose epoch can stop after any batch and continue, in a fresh
    process, with the next batch of the same order.

    A ``DistributedSampler``, so that Lightning leaves it in place under DDP (it would put its
    own in instead of any other). Subclasses give the order of an epoch (:meth:`order`) and
    which epoch an iteration draws (:meth:`next_epoch`). :meth:`position` is where the latest
    iteration stands after some of its batches; after :meth:`resume_from` the next iteration
    continues from there, whatever epoch was set: Lightning iterates a resumed loader before
    it sets the epoch.

    ``batch_size`` and ``drop_last``: those of the loader's batches, for counting them
    (DistributedSampler's own ``drop_last`` is whether to pad the shards, and stays False).
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int,
                 batch_size: int = 1, drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=seed)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.drops_last_batch = bool(drop_last)
        self._resume: tuple[int, int] | None = None  # (epoch, batches) the next iteration skips
        self._latest: int | None = None  # the epoch of the latest iteration

    @abstractmethod
    def order(self, epoch: int) -> list[int]:
        """This rank's indices of ``epoch``."""

    def next_epoch(self) -> int:
        """The epoch the next iteration draws (not resuming): the one set last."""
        return self.epoch

    def after_epoch(self) -> None:
        """Called once an iteration has yielded its last index."""

    def batches_per_epoch(self) -> int:
        n = len(self)
        return n // self.batch_size if self.drops_last_batch else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[int]:
        epoch, skip = self._resume if self._resume is not None else (self.next_epoch(), 0)
        self._resume = None
        self._latest = epoch
        yield from self.order(epoch)[skip * self.batch_size:]
        self.after_epoch()

    def position(self, batches: int, finished: bool = False) -> dict[str, Any]:
        """Where the latest iteration stands after ``batches`` batches (``finished``: its
        epoch is over even if it had more, as with ``limit_train_batches``; then the next
        epoch's start), with what the order is drawn from; plain values and tensors, for a
        checkpoint. ``started``: whether that epoch's iteration had begun."""
        epoch = self._latest
        started = epoch is not None
        if epoch is None:
            epoch, batches = self.next_epoch(), 0
        elif finished or batches >= self.batches_per_epoch():
            epoch, batches, started = epoch + 1, 0, False
        return {"epoch": epoch, "batches": int(batches), "started": started, "seed": self.seed,
                "num_images": num_images(self.dataset), "num_replicas": self.num_replicas,
                "batch_size": self.batch_size, **self.generator_state(epoch)}

    def resume_from(self, state: dict[str, Any]) -> None:
        """Continues at ``state`` (a :meth:`position`) on the next iteration; a position saved
        for another seed, number of images, ranks or batch size starts its epoch over."""
        batches = int(state["batches"])
        mine = {"seed": self.seed, "num_images": num_images(self.dataset),
                "num_replicas": self.num_replicas, "batch_size": self.batch_size}
        other = {k: state.get(k) for k in mine if state.get(k) != mine[k]}
        if other and batches:
            log.warning("data: the checkpoint's data position was saved with %s, not %s: "
                        "epoch %d starts over from its first batch", other,
                        {k: mine[k] for k in other}, state["epoch"])
            batches = 0
        self.load_generator_state(int(state["epoch"]), state)
        self._resume = (int(state["epoch"]), batches)

    def generator_state(self, epoch: int) -> dict[str, Any]:
        """What drawing ``epoch``'s order needs besides the seed (nothing: drawn afresh)."""
        return {}

    def load_generator_state(self, epoch: int, state: dict[str, Any]) -> None:
        pass


class ShuffleSampler(ResumableSampler):
    """The file datasets' training order: a new permutation of the images every epoch.

    ``shard`` (under DDP, where Lightning would put its own DistributedSampler in): that
    sampler's order, each rank its :func:`shard_indices` share of a permutation seeded with
    ``seed + epoch``, the epoch as set. Otherwise the permutations that torch's
    ``RandomSampler`` draws from the DataLoader's generator seeded with ``seed``, one per
    iteration, so that runs train in the order they always have. That generator is also the
    one the loader draws its workers' base seed from, one ``int64`` per iterator it makes
    (once with ``persistent_workers``, every epoch otherwise: ``loader_draws_every_epoch``);
    and ``RandomSampler`` draws a second, empty permutation when run to its end. Both draws
    are made here, on a generator of the sampler's own.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int,
                 batch_size: int = 1, drop_last: bool = False, shard: bool = True,
                 loader_draws_every_epoch: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas if shard else 1,
                         rank=rank if shard else 0, seed=seed, batch_size=batch_size,
                         drop_last=drop_last)
        self.shard = shard
        self.loader_draws_every_epoch = loader_draws_every_epoch
        self._gen = torch.Generator().manual_seed(seed)
        self._drawn = 0  # iterations drawn from _gen: the next one's epoch, unsharded
        self._gen_before = self._gen.get_state()  # before the latest iteration's draws

    def next_epoch(self) -> int:
        return self.epoch if self.shard else self._drawn

    def order(self, epoch: int) -> list[int]:
        n = num_images(self.dataset)
        if self.shard:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            return shard_indices(torch.randperm(n, generator=gen), self.rank,
                                 self.num_replicas).tolist()
        self._gen_before = self._gen.get_state()
        if self.loader_draws_every_epoch or epoch == 0:
            torch.empty((), dtype=torch.int64).random_(generator=self._gen)
        self._drawn = epoch + 1
        return torch.randperm(n, generator=self._gen).tolist()

    def after_epoch(self) -> None:
        if not self.shard:
            torch.randperm(num_images(self.dataset), generator=self._gen)

    def generator_state(self, epoch: int) -> dict[str, Any]:
        if self.shard:
            return {}
        # before `epoch`'s draws: the latest iteration's, or the next one's
        return {"generator": self._gen_before if epoch < self._drawn else self._gen.get_state()}

    def load_generator_state(self, epoch: int, state: dict[str, Any]) -> None:
        if not self.shard and "generator" in state:
            self._gen.set_state(state["generator"])
            self._drawn = epoch


class RepeatedAugSampler(ResumableSampler):
    """DeiT's repeated augmentation (Hoffer et al. 2020; DeiT's ``RASampler``): timm's
    ``RepeatAugSampler``, each image ``repeats`` times an epoch in a seeded order, the copies
    spread over the ranks (each augmented on its own), an epoch as many images per rank as
    DeiT's (the dataset rounded down to 256, over the ranks).

    The order is ``seed + epoch``'s, as DistributedSampler's is (timm's is the epoch's alone,
    the same for every seed).
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int,
                 repeats: int = 3, batch_size: int = 1, drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, seed=seed,
                         batch_size=batch_size, drop_last=drop_last)
        self.inner = RepeatAugSampler(dataset, num_replicas=num_replicas, rank=rank,
                                      shuffle=True, num_repeats=repeats)

    def order(self, epoch: int) -> list[int]:
        self.inner.set_epoch(self.seed + epoch)
        return list(self.inner)

    def __len__(self) -> int:
        return len(self.inner)
