"""Data modules: splits, normalisation, batching, shuffling/resume determinism, DDP sharding,
CIFAR on a fake pickle folder, image folders (layout checks, corrupt files). No downloads."""

from __future__ import annotations

import logging
import os
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from caitlab.data import (
    Cifar10DataModule,
    Cifar100DataModule,
    DataConfigError,
    DigitsDataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
    TensorBatches,
    shard_indices,
)

# ------------------------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(batch_size=100, seed=0)
    dm.setup("fit")
    return dm


def test_digits_split_is_fixed_disjoint_and_complete(digits):
    other = DigitsDataModule(batch_size=100, seed=123)
    other.setup("fit")
    idx = digits.split_indices
    sizes = {k: len(v) for k, v in idx.items()}
    assert sizes == {"train": 1258, "val": 180, "test": 359}
    assert sum(sizes.values()) == 1797
    together = torch.cat([idx["train"], idx["val"], idx["test"]])
    assert torch.equal(together.sort().values, torch.arange(1797))  # disjoint and complete
    for k in idx:  # the run seed does not move the split
        assert torch.equal(idx[k], other.split_indices[k])
        assert torch.equal(digits.tensors[k][1], other.tensors[k][1])
    assert digits.num_train_samples == 1258
    assert digits.describe()["num_train_samples"] == 1258


def test_digits_normalised_with_train_statistics(digits):
    x_train = digits.tensors["train"][0]
    assert abs(x_train.mean().item()) < 1e-5
    assert abs(x_train.std().item() - 1.0) < 1e-5
    # raw pixels are 0..16 scaled to [0, 1]: the stored statistics are of that scale
    assert 0.2 < digits.mean < 0.4 and 0.3 < digits.std < 0.5
    x_val = digits.tensors["val"][0]
    assert abs(x_val.mean().item()) < 0.1  # same distribution, not re-normalised


def test_digits_batches_shapes_dtypes_and_len(digits):
    train = digits.train_dataloader()
    batches = list(train)
    assert len(train) == len(batches) == 13  # ceil(1258 / 100)
    x, y = batches[0]
    assert x.shape == (100, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (100,) and y.dtype == torch.int64
    assert batches[-1][0].shape[0] == 58
    seen = torch.cat([b[1] for b in batches])
    assert torch.equal(seen.sort().values, digits.tensors["train"][1].sort().values)
    assert len(digits.val_dataloader()) == 2 and len(digits.test_dataloader()) == 4
    assert digits.describe() == {"datamodule": "DigitsDataModule", "num_classes": 10,
                                 "in_chans": 1, "img_size": 8, "batch_size": 100,
                                 "num_train_samples": 1258}


def test_digits_drop_last_only_on_train():
    dm = DigitsDataModule(batch_size=100, drop_last=True)
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(dm.train_dataloader()) == len(train) == 12
    assert all(x.shape[0] == 100 for x, _ in train)
    val = list(dm.val_dataloader())
    assert [x.shape[0] for x, _ in val] == [100, 80]


def test_digits_resize_and_three_channels():
    dm = DigitsDataModule(batch_size=32, img_size=16, in_chans=3)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 16, 16) and y.shape == (32,)
    assert torch.equal(x[:, 0], x[:, 2])
    assert (dm.img_size, dm.in_chans, dm.num_classes) == (16, 3, 10)


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"in_chans": 2}, "data.in_chans"),
    ({"num_classes": 100}, "data.num_classes"),
    ({"batch_size": 0}, "data.batch_size"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, "data.val_fraction"),
])
def test_digits_inconsistent_config(kwargs, key):
    with pytest.raises(DataConfigError, match=key) as err:
        DigitsDataModule(**kwargs)
    assert "\n" not in str(err.value)


def _first_labels(loader, n=3):
    return torch.cat([y for _, y in loader][:n])


def test_digits_shuffle_per_epoch_and_resume_determinism():
    a = DigitsDataModule(batch_size=64)
    b = DigitsDataModule(batch_size=64)
    a.setup("fit")
    b.setup("fit")
    a.trainer = SimpleNamespace(current_epoch=0)
    loader_a = a.train_dataloader()  # one loader, re-iterated every epoch
    epoch0 = _first_labels(loader_a)
    a.trainer.current_epoch = 1
    epoch1 = _first_labels(loader_a)
    a.trainer.current_epoch = 3
    epoch3 = _first_labels(loader_a)
    assert not torch.equal(epoch0, epoch1) and not torch.equal(epoch1, epoch3)
    # a "resumed" module that starts directly at epoch 3 sees the same batches
    b.trainer = SimpleNamespace(current_epoch=3)
    assert torch.equal(_first_labels(b.train_dataloader()), epoch3)
    # and the permutation is seed + epoch
    perm = torch.randperm(1258, generator=torch.Generator().manual_seed(0 + 3))
    assert torch.equal(epoch3, a.tensors["train"][1][perm[:192]])
    # another run seed shuffles differently
    c = DigitsDataModule(batch_size=64, seed=1)
    c.setup("fit")
    c.trainer = SimpleNamespace(current_epoch=3)
    assert not torch.equal(_first_labels(c.train_dataloader()), epoch3)


def test_digits_val_not_shuffled(digits):
    digits.trainer = SimpleNamespace(current_epoch=0)
    first = torch.cat([y for _, y in digits.val_dataloader()])
    digits.trainer.current_epoch = 5
    again = torch.cat([y for _, y in digits.val_dataloader()])
    digits.trainer = None
    assert torch.equal(first, digits.tensors["val"][1])
    assert torch.equal(again, first)


def test_digits_with_lightning_trainer_sees_epoch_permutations():
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 10)
            self.seen = []

        def training_step(self, batch, i):
            x, y = batch
            if i == 0:
                self.seen.append((self.current_epoch, y.clone()))
            return torch.nn.functional.cross_entropy(self.lin(x.flatten(1)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = DigitsDataModule(batch_size=512)
    model = Probe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, limit_val_batches=0,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, dm)
    assert [e for e, _ in model.seen] == [0, 1]
    loader = dm.train_dataloader()
    for epoch, y in model.seen:
        assert torch.equal(y, dm.tensors["train"][1][loader.indices(epoch)[:512]])


# ------------------------------------------------------------------------------ DDP sharding


@pytest.mark.parametrize("n", [10, 11, 13])
def test_shard_indices_two_ranks(n):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    r0, r1 = shard_indices(perm, 0, 2), shard_indices(perm, 1, 2)
    assert len(r0) == len(r1) == (n + 1) // 2
    union = torch.cat([r0, r1])
    assert set(union.tolist()) == set(perm.tolist())  # nothing dropped
    pad = len(union) - n
    assert pad == n % 2  # padded by repeating the start of the permutation
    assert len(set(r0.tolist()) & set(r1.tolist())) == pad
    if pad:
        assert r1[-1] == perm[0]


def test_shard_indices_pads_when_fewer_samples_than_ranks():
    perm = torch.tensor([4, 2])
    shares = [shard_indices(perm, r, 3) for r in range(3)]
    assert [s.tolist() for s in shares] == [[4], [2], [4]]


def test_tensor_batches_two_ranks_equal_batches_cover_epoch():
    x = torch.arange(23, dtype=torch.float32)[:, None]
    y = torch.arange(23)
    ranks = [TensorBatches(x, y, 5, shuffle=True, seed=3, epoch_fn=lambda: 2,
                           rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # ceil(12 / 5)
    labels = [torch.cat([yb for _, yb in loader]) for loader in ranks]
    assert [len(v) for v in labels] == [12, 12]
    union = torch.cat(labels)
    assert set(union.tolist()) == set(range(23))
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(3 + 2))
    assert torch.equal(labels[0], perm[0::2])
    assert torch.equal(labels[1], torch.cat([perm[1::2], perm[:1]]))
    for loader in ranks:
        for xb, yb in loader:
            assert torch.equal(xb[:, 0].long(), yb)  # x and y stay paired
    single = TensorBatches(x, y, 5)
    assert len(single) == 5 and single.rank_world() == (0, 1)


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_shapes_and_determinism():
    kw = dict(batch_size=8, img_size=16, in_chans=3, num_classes=7, num_train=20, num_val=6,
              num_test=5)
    a, b, c = (SyntheticDataModule(seed=s, **kw) for s in (1, 1, 2))
    assert not a.tensors  # lazy
    for dm in (a, b, c):
        dm.setup("fit")
    assert set(a.tensors) == {"train", "val"}
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(a.train_dataloader()) == 3 and len(a.val_dataloader()) == 1
    assert int(a.tensors["train"][1].max()) < 7 and int(a.tensors["train"][1].min()) >= 0
    for split in ("train", "val"):
        assert torch.equal(a.tensors[split][0], b.tensors[split][0])
        assert torch.equal(a.tensors[split][1], b.tensors[split][1])
        assert not torch.equal(a.tensors[split][0], c.tensors[split][0])
    assert not torch.equal(a.tensors["train"][0][:6], a.tensors["val"][0])
    # a split's content does not depend on the stage that generated it
    d = SyntheticDataModule(seed=1, **kw)
    d.setup("validate")
    assert set(d.tensors) == {"val"} and torch.equal(d.tensors["val"][0], a.tensors["val"][0])
    assert a.num_train_samples == 20


# ------------------------------------------------------------------------------ CIFAR


def _fake_cifar10(root, n_per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [(k + j) % 10 for j in range(n_per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_cifar_missing_dataset_names_root_and_download(tmp_path):
    with pytest.raises(DataConfigError, match=r"data\.root: .*data\.download=true") as err:
        Cifar10DataModule(root=str(tmp_path / "nowhere"))
    assert "\n" not in str(err.value) and "nowhere" in str(err.value)
    (tmp_path / "cifar-100-python").mkdir()
    with pytest.raises(DataConfigError, match=r"data\.root: .*cifar-100-python.*missing"):
        Cifar100DataModule(root=str(tmp_path))
    with pytest.raises(DataConfigError, match="data.num_classes"):
        Cifar100DataModule(root=str(tmp_path), num_classes=10, download=True)
    assert Cifar100DataModule(root=str(tmp_path), download=True).num_classes == 100


def test_cifar_on_fake_folder(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    _fake_cifar10(tmp_path)
    # the fake files cannot match torchvision's md5 sums: check only that they exist
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    dm = Cifar10DataModule(root=str(tmp_path), batch_size=4, img_size=40, num_workers=0,
                           val_fraction=0.25)
    dm.setup("fit")
    assert dm.num_train_samples == 15 and len(dm.val_set) == 5
    train_idx, val_idx = set(dm.train_set.indices), set(dm.val_set.indices)
    assert not train_idx & val_idx and len(train_idx | val_idx) == 20
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 40, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    # val: deterministic eval transform of the same images; normalised with CIFAR statistics
    xv, yv = dm.val_set[0]
    xv2, _ = dm.val_set[0]
    assert torch.equal(xv, xv2) and xv.shape == (3, 40, 40)
    base = dm.val_set.dataset
    assert yv == base.targets[dm.val_set.indices[0]]
    dm.setup("test")
    xt, _ = next(iter(dm.test_dataloader()))
    assert xt.shape == (4, 3, 40, 40) and len(dm.test_set) == 4
    # native size and no resize: pixel values are exactly (v / 255 - mean) / std
    dm32 = Cifar10DataModule(root=str(tmp_path), num_workers=0)
    dm32.setup("test")
    img, _ = dm32.test_set[0]
    raw = torch.as_tensor(dm32.test_set.data[0]).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(dm32.mean)[:, None, None], torch.tensor(dm32.std)[:, None, None]
    assert torch.allclose(img, (raw - mean) / std, atol=1e-5)


# ------------------------------------------------------------------------------ image folder


def _image_folder(root, classes=("cat", "dog"), n=4, size=20):
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                colour = (200 * c, 10 * i, 100)
                Image.new("RGB", (size, size + 4), colour).save(d / f"{i}.png")
    return root


def _folder_dm(root, **kw):
    args = dict(batch_size=4, img_size=16, num_classes=2, num_workers=0)
    args.update(kw)
    return ImageFolderDataModule(root=str(root), **args)


def test_image_folder_batches(tmp_path):
    dm = _folder_dm(_image_folder(tmp_path))
    assert dm.classes == ["cat", "dog"]
    dm.setup("fit")
    assert dm.num_train_samples == 8
    train = list(dm.train_dataloader())
    assert len(train) == 2
    x, y = train[0]
    # uint8 from the workers; normalised once on the device (on_after_batch_transfer)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.uint8 and y.dtype == torch.int64
    x, y = dm.on_after_batch_transfer(train[0], 0)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert sorted(torch.cat([yb for _, yb in train]).tolist()) == [0] * 4 + [1] * 4
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (4, 3, 16, 16) and yv.tolist() == [0, 0, 0, 0]
    # eval transform is deterministic: red channel of "dog" (200) > red channel of "cat" (0)
    val = list(dm.val_dataloader())
    assert val[1][1].tolist() == [1, 1, 1, 1]
    assert val[1][0][:, 0].mean() > val[0][0][:, 0].mean() + 1.0
    assert [b[1].tolist() for b in dm.test_dataloader()] == [b[1].tolist() for b in val]


@pytest.mark.parametrize("case", ["root", "train", "no_classes", "num_classes", "val_classes"])
def test_image_folder_layout_errors(tmp_path, case):
    root = tmp_path / "data"
    if case == "root":
        expected = rf"data\.root: {root} does not exist"
    elif case == "train":
        (root / "val" / "a").mkdir(parents=True)
        expected = rf"data\.root: {root} has no train/ folder"
    elif case == "no_classes":
        (root / "train" / ".hidden").mkdir(parents=True)
        (root / "val" / "a").mkdir(parents=True)
        expected = rf"data\.root: {root} has no class folders under train/"
    elif case == "num_classes":
        _image_folder(root, classes=("a", "b", "c"), n=1)
        expected = rf"data\.num_classes: 2 but {root}/train/ has 3 class folders"
    else:
        _image_folder(root, n=1)
        (root / "val" / "dog").rename(root / "val" / "wolf")
        expected = r"data\.root: .*different class folders.*only in val: \['wolf'\]"
    with pytest.raises(DataConfigError, match=expected) as err:
        _folder_dm(root)
    assert "\n" not in str(err.value)


def test_image_folder_bad_options(tmp_path):
    root = _image_folder(tmp_path, n=1)
    with pytest.raises(DataConfigError, match="data.on_corrupt"):
        _folder_dm(root, on_corrupt="ignore")
    with pytest.raises(DataConfigError, match="data.in_chans"):
        _folder_dm(root, in_chans=1)
    with pytest.raises(DataConfigError, match="data.auto_augment"):
        _folder_dm(root, auto_augment="bogus-policy")
    assert _folder_dm(root, auto_augment="none").auto_augment is None


def _corrupt(root):
    bad = root / "train" / "dog" / "1.png"
    bad.write_bytes(b"this is not a png \x00\x01\x02" * 10)
    return bad


def test_image_folder_corrupt_stop(tmp_path):
    bad = _corrupt(_image_folder(tmp_path))
    dm = _folder_dm(tmp_path, on_corrupt="stop")
    dm.setup("fit")
    with pytest.raises(DataConfigError, match="data.on_corrupt=skip") as err:
        for _ in dm.train_dataloader():
            pass
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_image_folder_corrupt_skip(tmp_path, caplog):
    bad = _corrupt(_image_folder(tmp_path))
    dm = _folder_dm(tmp_path, on_corrupt="skip", drop_last=False, batch_size=3)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING, logger="caitlab.data"):
        batches = list(dm.train_dataloader())
    assert [x.shape[0] for x, _ in batches] == [3, 3, 2]  # sizes kept, the file replaced
    assert all(x.shape[1:] == (3, 16, 16) for x, _ in batches)
    warned = [r.getMessage() for r in caplog.records if str(bad) in r.getMessage()]
    assert len(warned) == 1
    assert dm.train_set.skipped == {str(bad)}
