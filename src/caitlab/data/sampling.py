"""In-memory batches drawn in a seeded per-epoch order, and their DDP sharding.

Lightning passes an iterable that is not a ``DataLoader`` through untouched (it injects a
``DistributedSampler`` only into a real ``DataLoader``), so :class:`TensorBatches` shards for
itself, the way that sampler does: :func:`shard_indices`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DistributedSampler


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



class RepeatedAugSampler(DistributedSampler):
    """DeiT's repeated augmentation (Hoffer et al. 2020; DeiT's ``RASampler``): timm's
    ``RepeatAugSampler``, each image ``repeats`` times an epoch in a seeded order, the copies
    spread over the ranks (each augmented on its own), an epoch as many images per rank as
    DeiT's (the dataset rounded down to 256, over the ranks).

    A ``DistributedSampler`` so that Lightning leaves it in place under DDP (it would wrap any
    other sampler in its own); the order is ``seed + epoch``'s, as DistributedSampler's is
    (timm's is the epoch's alone, the same for every seed).
    """

    def __init__(self, dataset, *, num_replicas: int, rank: int, seed: int,
                 repeats: int = 3) -> None:
        from timm.data.distributed_sampler import RepeatAugSampler

        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=seed)
        self.inner = RepeatAugSampler(dataset, num_replicas=num_replicas, rank=rank,
                                      shuffle=True, num_repeats=repeats)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.inner.set_epoch(self.seed + epoch)

    def __iter__(self):
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)
