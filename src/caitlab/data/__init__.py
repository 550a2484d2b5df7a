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
  :class:`ImageFolderDataModule`): ``DataLoader``\\ s with workers, the training one on a
  sampler that shards under DDP as Lightning's ``DistributedSampler`` does and whose position
  each checkpoint holds (:class:`~caitlab.data.sampling.ResumableSampler`), so that a run
  stopped mid-epoch resumes with its next batch. ``num_workers: auto`` is one fewer than the
  CPUs of the rank (:func:`caitlab.cpus.available_cpus`: affinity mask,
  ``SLURM_CPUS_PER_TASK``), and a count above them is capped, said once.

Every module refuses in ``setup('fit')`` a training split that makes no batch under
``drop_last`` (per rank under DDP), instead of an epoch that trains nothing.

One module per source (:mod:`~caitlab.data.digits`, :mod:`~caitlab.data.synthetic`,
:mod:`~caitlab.data.cifar`, :mod:`~caitlab.data.imagefolder`), on the shared bases
(:mod:`~caitlab.data.base`), the in-memory sampler (:mod:`~caitlab.data.sampling`), image
decoding (:mod:`~caitlab.data.images`), the augmentation guard (:mod:`~caitlab.data.augment`)
and the errors (:mod:`~caitlab.data.errors`). The configs name the modules by the names
re-exported here (``caitlab.data.DigitsDataModule``), which old run signatures hold.
"""

from caitlab.data.base import SPLIT_SEED, DataModuleBase, loader_workers, split_permutation
from caitlab.data.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    Cifar10DataModule,
    Cifar100DataModule,
)
from caitlab.data.digits import DigitsDataModule
from caitlab.data.errors import DataConfigError, ImageReadError, data_error_message
from caitlab.data.imagefolder import INTERPOLATIONS, ImageFolderDataModule
from caitlab.data.images import ON_CORRUPT, find_class_folders, load_rgb
from caitlab.data.sampling import TensorBatches, dist_rank_world, shard_indices
from caitlab.data.synthetic import SyntheticDataModule

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "INTERPOLATIONS",
    "ON_CORRUPT",
    "SPLIT_SEED",
    "Cifar10DataModule",
    "Cifar100DataModule",
    "DataConfigError",
    "DataModuleBase",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "ImageReadError",
    "SyntheticDataModule",
    "TensorBatches",
    "data_error_message",
    "dist_rank_world",
    "find_class_folders",
    "load_rgb",
    "loader_workers",
    "shard_indices",
    "split_permutation",
]
