"""Real photographs through the image-folder pipeline: no valid image, and no draw of the
default DeiT recipe, may crash an epoch; a failure that does happen is one line naming the
file; sizes and worker counts that cannot be what was meant are refused or said once.

The photos are the two scikit-learn ships (``china.jpg``, ``flower.jpg``, 640x427): no network.
"""

from __future__ import annotations

import json
import logging
import math
import random
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_aa
from torch.utils.data import DataLoader

from caitlab.cpus import available_cpus
from caitlab.data import (
    DataConfigError,
    DigitsDataModule,
    ImageFolderDataModule,
    ImageReadError,
    SyntheticDataModule,
    augment,
    data_error_message,
    loader_workers,
)
from caitlab.data.augment import augment_ops, guard_augment_ops, posterize
from caitlab.train import CONF_DIR
from conftest import (
    FAULTS_OUTSIDE_SIGNATURE,
    assert_same_weights,
    clean_env,
    last_weights,
    make_image_folder,
)

PHOTOS = ("china.jpg", "flower.jpg")


@cache
def photos() -> tuple[Image.Image, ...]:
    from sklearn.datasets import load_sample_image

    return tuple(Image.fromarray(load_sample_image(name)) for name in PHOTOS)


def recipe() -> dict:
    """The training-transform keys of the shipped data=imagefolder config."""
    conf = OmegaConf.load(Path(CONF_DIR) / "data" / "imagefolder.yaml")
    return {k: conf[k] for k in ("auto_augment", "reprob", "color_jitter", "interpolation",
                                 "crop_pct", "drop_last", "on_corrupt")}


def make_photo_folder(root: Path, per_class: int = 16, val: int = 4, seed: int = 0) -> Path:
    """``root/{train,val}/<class>/``: four classes, the left and right halves of each photo, each
    image a random crop of 48-128 px a side (any aspect), alternately JPEG and PNG."""
    rng = random.Random(seed)
    regions = {}
    for photo, name in zip(photos(), ("china", "flower"), strict=True):
        w, h = photo.size
        regions[f"{name}_left"] = photo.crop((0, 0, w // 2, h))
        regions[f"{name}_right"] = photo.crop((w // 2, 0, w, h))
    for split, n in (("train", per_class), ("val", val)):
        for name, region in regions.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                cw, ch = rng.randint(48, 128), rng.randint(48, 128)
                x, y = rng.randint(0, region.width - cw), rng.randint(0, region.height - ch)
                crop = region.crop((x, y, x + cw, y + ch))
                crop.save(folder / f"{i}.{'jpg' if i % 2 == 0 else 'png'}")
    return root


def folder_dm(root: Path, **kw) -> ImageFolderDataModule:
    args = dict(recipe(), batch_size=8, img_size=32, num_classes=4, num_workers=0)
    args.update(kw)
    return ImageFolderDataModule(root=str(root), **args)


class ZeroBitsSeen:
    """Wraps the guarded posterize ops of a transform, counting the draws that keep 0 bits."""

    def __init__(self, transform) -> None:
        self.count = 0
        ops = [op for op in augment_ops(transform) if op.aug_fn is posterize]
        assert ops, "the transform has no guarded posterize op"
        for op in ops:
            op.aug_fn = self._spy

    def _spy(self, img, bits_to_keep, **kwargs):
        self.count += bits_to_keep < 1
        return posterize(img, bits_to_keep, **kwargs)


# ------------------------------------------------------------------------------ posterize


def test_posterize_keeps_zero_bits_as_black_and_otherwise_is_timms():
    img = photos()[0].crop((0, 0, 40, 30))
    # the bug being guarded: timm hands 0 bits to a Pillow that refuses them
    with pytest.raises(ValueError, match="bits must be between or equal to 1 and 8"):
        timm_aa.posterize(img, 0)
    black = posterize(img, 0)
    assert black.mode == "RGB" and black.size == (40, 30)
    assert not np.asarray(black).any()
    for bits in (1, 4, 7):
        assert np.array_equal(np.asarray(posterize(img, bits)),
                              np.asarray(ImageOps.posterize(img, bits)))
    assert posterize(img, 8) is img  # timm's own shortcut


@pytest.mark.parametrize("policy,posterize_ops", [
    ("rand-m9-mstd0.5-inc1", 1),  # PosterizeIncreasing: 0 bits at magnitude 10
    ("rand-m9-mstd0.5", 1),  # Posterize: 0 bits below magnitude 2.5
    ("v0", 2),  # AutoAugment v0: its ('Posterize', 0.8, 2) always keeps int(0.8) = 0 bits
    ("augmix-m5-w4-d2", 1),
])
def test_every_timm_posterize_op_of_a_policy_is_guarded(tmp_path, policy, posterize_ops):
    dm = folder_dm(make_photo_folder(tmp_path, per_class=1, val=1), auto_augment=policy)
    ops = list(augment_ops(dm.train_transform))
    assert ops  # the walk reaches timm's ops (fails if a timm release hides them elsewhere)
    assert not [op for op in ops if op.aug_fn is augment._TIMM_POSTERIZE]
    assert guard_augment_ops(dm.train_transform) == posterize_ops


def test_default_recipe_never_raises_on_real_photos(tmp_path):
    """5,000 draws of the shipped training transform over both photos (seeded): the draws
    include several that keep 0 bits (about 1 in 700; on timm's own posterize each of them
    raised), and every draw gives a finite 3x32x32 tensor."""
    dm = folder_dm(make_photo_folder(tmp_path, per_class=1, val=1))
    assert recipe()["auto_augment"] == "rand-m9-mstd0.5-inc1"
    seen = ZeroBitsSeen(dm.train_transform)
    random.seed(0)
    np.random.seed(0)  # timm's RandAugment picks its ops with numpy's generator
    torch.manual_seed(0)
    images = photos()
    draws, bad = 5000, []
    for i in range(draws):
        x = dm.train_transform(images[i % 2])
        if x.shape != (3, 32, 32) or not torch.isfinite(x).all():
            bad.append((i, tuple(x.shape)))
    assert bad == []
    assert seen.count >= 2, f"only {seen.count} zero-bit draws in {draws}: the test lost its point"


def _odd_images(root: Path) -> dict[str, tuple[str, tuple[int, int]]]:
    """Valid images of every mode PIL reads and of degenerate sizes, cut from the photos:
    ``{file name: (mode as read back, size)}``."""
    china = photos()[0]
    crop = china.crop((100, 100, 180, 160))
    arr = np.asarray(crop)
    rgba = crop.convert("RGBA")
    rgba.putalpha(Image.fromarray((arr[..., 0] > 128).astype(np.uint8) * 255))
    palette_alpha = crop.convert("P")
    palette_alpha.info["transparency"] = 0
    made = {
        "bilevel.png": crop.convert("1"), "grey.png": crop.convert("L"),
        "grey.jpg": crop.convert("L"), "grey_alpha.png": crop.convert("LA"),
        "palette.png": crop.convert("P"), "palette_alpha.png": palette_alpha,
        "rgba.png": rgba, "cmyk.jpg": crop.convert("CMYK"), "lab.tif": crop.convert("LAB"),
        "grey16.png": Image.fromarray(arr[..., 0].astype(np.uint16) * 257),
        "int32.tif": Image.fromarray(arr[..., 0].astype(np.int32) * 100),
        "float.tif": Image.fromarray(arr[..., 0].astype(np.float32) / 255),
        "rgb.webp": crop, "rgb.bmp": crop, "rgb.gif": crop, "rgb.ppm": crop,
        "grey.pgm": crop.convert("L"), "ycbcr.tif": crop.convert("YCbCr"),
        "1x1.png": china.crop((0, 0, 1, 1)), "2x3.jpg": china.crop((5, 5, 7, 8)),
        "1x300.png": china.crop((0, 0, 1, 300)), "300x1.png": china.crop((0, 0, 300, 1)),
        "whole_photo.jpg": china,
    }
    found = {}
    for name, img in made.items():
        img.save(root / name, save_all=name.endswith(".gif"))
        with Image.open(root / name) as back:
            found[name] = (back.mode, back.size)
    return found


def test_any_valid_image_mode_and_size_goes_through_both_transforms(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / split / "odd").mkdir(parents=True)
        (root / split / "photo").mkdir(parents=True)
        made = _odd_images(root / split / "odd")
        photos()[1].save(root / split / "photo" / "flower.jpg")
    modes = {mode for mode, _ in made.values()}
    assert {"1", "L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "LAB"} <= modes
    dm = folder_dm(root, num_classes=2)
    dm.setup("fit")
    seen = ZeroBitsSeen(dm.train_set.transform)
    # every RNG the recipe draws from (timm's RandAugment picks its ops with numpy's): the
    # draws are then the same whichever tests ran before in this process
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    n = len(dm.train_set)
    for i in range(120 * n):  # 120 draws of each file
        x, _ = dm.train_set[i % n]
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all(), dm.train_set.samples[i % n]
    for i in range(len(dm.val_set)):
        x, _ = dm.val_set[i]
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all(), dm.val_set.samples[i]
    assert seen.count >= 1  # the draws reached the op that raises on timm's own


# ------------------------------------------------------------------------------ worker errors


class FailOnWidth:
    """A transform that fails, as timm's posterize did, on images ``width`` px wide."""

    def __init__(self, inner, width: int) -> None:
        self.inner, self.width = inner, width

    def __call__(self, img):
        if img.width == self.width:
            raise ValueError("bits must be between or equal to 1 and 8")
        return self.inner(img)


class PoisonedImageFolder(ImageFolderDataModule):
    """The image-folder module whose training transform fails on 77 px wide images."""

    def _transforms(self):
        train, evaluation = super()._transforms()
        return FailOnWidth(train, 77), evaluation


def _poison(root: Path) -> Path:
    bad = root / "train" / "flower_left" / "poison.png"
    photos()[1].crop((0, 0, 77, 60)).save(bad)
    return bad


def test_transform_error_in_a_worker_is_one_line_with_file_and_cause(tmp_path):
    bad = _poison(make_photo_folder(tmp_path, per_class=4, val=1))
    dm = PoisonedImageFolder(root=str(tmp_path), **{**recipe(), "batch_size": 4,
                                                    "img_size": 32, "num_classes": 4,
                                                    "num_workers": 2})
    dm.setup("fit")
    with pytest.raises(ImageReadError) as err:
        for _ in DataLoader(dm.train_set, batch_size=4, num_workers=2):
            pass
    assert "DataLoader worker process" in str(err.value)  # torch's wrapping, unwrapped below
    assert data_error_message(err.value) == (
        f"data: the transform failed on image {bad} (ValueError: bits must be between or "
        "equal to 1 and 8)")


def test_worker_failure_reaches_the_user_as_one_line(tmp_path, forkserver):
    root, out = tmp_path / "images", tmp_path / "out"
    out.mkdir()
    bad = _poison(make_photo_folder(root, per_class=4, val=1))
    proc = forkserver.run(out, "data=imagefolder", f"data.root={root}",
                          "data._target_=test_data_images.PoisonedImageFolder",
                          "data.num_classes=4", "data.batch_size=4", "data.num_workers=2",
                          *TINY_MODEL, "trainer.max_epochs=1", "logger=csv", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("caitlab-train:")]
    (run,) = [p.parent for p in out.rglob("summary.json")]
    assert errors == [
        f"caitlab-train: error: data: the transform failed on image {bad} (ValueError: bits "
        f"must be between or equal to 1 and 8); traceback in {run / 'error.log'}"]
    assert "Traceback" not in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and str(bad) in summary["error"]
    log = (run / "error.log").read_text()
    assert "DataLoader worker process" in log and "in __call__" in log  # the worker's frames


# ------------------------------------------------------------------------------ batches


def test_too_few_images_for_one_batch_under_drop_last(tmp_path):
    dm = SyntheticDataModule(num_train=40, batch_size=64, drop_last=True)
    with pytest.raises(DataConfigError) as err:
        dm.setup("fit")
    assert str(err.value) == (
        "data: 40 training images make no batch of data.batch_size=64 with "
        "data.drop_last=true; set data.batch_size=40 or lower, or data.drop_last=false")
    SyntheticDataModule(num_train=40, batch_size=64, drop_last=False).setup("fit")
    SyntheticDataModule(num_train=64, batch_size=64, drop_last=True).setup("fit")
    dm.setup("test")  # testing drops nothing
    # image folders: the same rule, with the recipe's drop_last=true
    folder = folder_dm(make_photo_folder(tmp_path, per_class=2, val=1), batch_size=16)
    with pytest.raises(DataConfigError, match="data: 8 training images make no batch of "
                                              "data.batch_size=16"):
        folder.setup("fit")


def test_too_few_images_per_rank_under_ddp():
    # 1258 training digits on 32 ranks: 40 each (DistributedSampler pads to ceil(n / ranks))
    dm = DigitsDataModule(batch_size=64, drop_last=True)
    dm.trainer = SimpleNamespace(global_rank=3, world_size=32)
    with pytest.raises(DataConfigError) as err:
        dm.setup("fit")
    assert str(err.value) == (
        "data: 1258 training images (40 per rank on 32 ranks) make no batch of "
        "data.batch_size=64 with data.drop_last=true; set data.batch_size=40 or lower, or "
        "data.drop_last=false")
    dm.trainer = SimpleNamespace(global_rank=3, world_size=19)  # ceil(1258 / 19) = 67
    dm.setup("fit")
    assert math.ceil(1258 / 19) >= 64


def test_no_batch_is_refused_before_training(tmp_path, forkserver):
    proc = forkserver.run(tmp_path, "data=synthetic", "data.num_train=40", "data.batch_size=64",
                          "data.drop_last=true", "data.img_size=8", "data.num_classes=10",
                          "model=vit_tiny", "model.depth=1", "logger=csv", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("caitlab-train:")]
    assert errors == [
        "caitlab-train: error: data: 40 training images make no batch of data.batch_size=64 "
        "with data.drop_last=true; set data.batch_size=40 or lower, or data.drop_last=false"]
    (run,) = [p.parent for p in tmp_path.rglob("summary.json")]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "test/top1" not in summary
    assert not list(run.rglob("*.ckpt"))  # nothing trained


# ------------------------------------------------------------------------------ sizes


def test_photos_shrunk_to_a_toy_size_are_refused(tmp_path):
    root = make_photo_folder(tmp_path, per_class=3, val=1)
    with pytest.raises(DataConfigError) as err:
        folder_dm(root, img_size=8)
    msg = str(err.value)
    assert msg.startswith("data.img_size=8 (it follows model.img_size) would shrink images "
                          f"like {root}/train/")
    assert "to 8x8 px; set model.img_size=" in msg and "\n" not in msg
    suggested = int(msg.split("set model.img_size=")[1].split()[0])
    assert suggested % 16 == 0 and 32 <= suggested <= 128  # the crops are 48-128 px
    assert folder_dm(root, img_size=32).img_size == 32  # a real (if small) size is the user's
    # images of about the input size (digits-like, or a downsampled dataset) are fine at 8
    small = tmp_path / "small"
    for split in ("train", "val"):
        for c in range(4):
            (small / split / f"c{c}").mkdir(parents=True)
            photos()[0].crop((0, 0, 20, 24)).save(small / split / f"c{c}" / "0.png")
    assert folder_dm(small, img_size=8).img_size == 8
    # full-size photos suggest the usual 224
    big = tmp_path / "big"
    for split in ("train", "val"):
        for c in range(4):
            (big / split / f"c{c}").mkdir(parents=True)
            photos()[c % 2].save(big / split / f"c{c}" / "0.jpg")
    with pytest.raises(DataConfigError, match=r"\(640x427 px\) to 16x16 px; set "
                                              r"model\.img_size=224 "):
        folder_dm(big, img_size=16)


def test_image_folder_without_model_img_size_is_refused(tmp_path, forkserver):
    root, out = tmp_path / "images", tmp_path / "out"
    out.mkdir()
    make_photo_folder(root, per_class=2, val=1)
    proc = forkserver.run(out, "data=imagefolder", f"data.root={root}", "data.num_classes=4",
                          "logger=csv", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("caitlab-train:")]
    assert len(errors) == 1
    assert errors[0].startswith("caitlab-train: error: data.img_size=8 (it follows "
                                "model.img_size) would shrink images like")


# ------------------------------------------------------------------------------ workers


def test_worker_counts_follow_the_cpus(monkeypatch):
    assert loader_workers("auto", 1) == (0, None)
    assert loader_workers("auto", 16) == (15, None)
    assert loader_workers(2, 2) == (2, None)
    assert loader_workers(0, 2) == (0, None)
    assert loader_workers(8, 2) == (2, "data.num_workers=8 but this process has 2 CPUs: using "
                                       "2 loader workers (data.num_workers=auto follows the CPUs)")
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert available_cpus() == 4
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert available_cpus() == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "12")  # no more than the task may run on
    assert available_cpus() == 4
    with pytest.raises(DataConfigError, match="data.num_workers: must be an integer >= 0 or "
                                              "auto, got 'many'"):
        SyntheticDataModule(num_workers="many")


def test_too_many_workers_are_capped_and_said_once(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    dm = folder_dm(make_photo_folder(tmp_path, per_class=2, val=1), num_workers=8)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING, logger="caitlab.data"):
        loaders = [dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()]
    assert [dl.num_workers for dl in loaders] == [2, 2, 2]
    assert [r.getMessage() for r in caplog.records] == [
        "data.num_workers=8 but this process has 2 CPUs: using 2 loader workers "
        "(data.num_workers=auto follows the CPUs)"]
    # the default: one worker fewer than the CPUs, shared by the ranks of a machine
    assert recipe() and OmegaConf.load(Path(CONF_DIR) / "data" / "imagefolder.yaml"
                                       ).num_workers == "auto"
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    auto = folder_dm(tmp_path, num_workers="auto")
    auto.trainer = SimpleNamespace(global_rank=0, world_size=2, num_devices=2)
    assert auto.loader_workers() == 7


# ------------------------------------------------------------------------------ a real epoch

TINY_MODEL = ("model=vit_tiny", "model.img_size=32", "model.patch_size=8", "model.embed_dim=32",
              "model.depth=1")


def test_real_photo_folder_trains_an_epoch_with_the_default_recipe(tmp_path, forkserver):
    """Four classes of real photo crops, 64 training images, the shipped recipe (RandAugment
    rand-m9-mstd0.5-inc1, random erasing, drop_last) and two loader workers: the run completes
    and says nothing about its workers. Seed 1: this run's training draws include a 0-bit
    posterize, on which timm's own op raises ("Caught ValueError in DataLoader worker process
    0.")."""
    root, out = tmp_path / "images", tmp_path / "out"
    out.mkdir()
    make_photo_folder(root)
    proc = forkserver.run(out, "data=imagefolder", f"data.root={root}", "data.num_classes=4",
                          "data.batch_size=16", "data.num_workers=2", *TINY_MODEL,
                          "trainer.max_epochs=2", "logger=csv", "seed=1", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p.parent for p in out.rglob("summary.json")]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["test/top1"] is not None
    # val/ chose best.ckpt and is the test split: the last checkpoint is scored, on the
    # images the last epoch was validated on
    assert summary["selection"] == {"split": "val/", "scored": "last",
                                    "test_is_selection": False}
    assert summary["test/top1"] == pytest.approx(summary["val/top1"], abs=1e-6)
    assert "num_workers" not in proc.stdout + proc.stderr
    rows = (run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    epochs = {r.split(",")[header.index("epoch")] for r in rows[1:]
              if r.split(",")[header.index("train/loss_epoch")] not in ("", None)}
    assert epochs == {"0", "1"}  # 64 images // 16 = 4 batches an epoch, both epochs trained


def test_more_workers_than_cpus_is_said_once_in_a_run(tmp_path, forkserver):
    root, out = tmp_path / "images", tmp_path / "out"
    out.mkdir()
    make_photo_folder(root, per_class=4, val=2)
    proc = forkserver.run(out, "data=imagefolder", f"data.root={root}", "data.num_classes=4",
                          "data.batch_size=8", "data.num_workers=8", *TINY_MODEL,
                          "trainer.max_epochs=1", "logger=csv",
                          env=clean_env(SLURM_CPUS_PER_TASK="2"))
    said = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "num_workers" in ln]
    assert len(said) == 1, said
    assert said[0].endswith("data.num_workers=8 but this process has 2 CPUs: using 2 loader "
                            "workers (data.num_workers=auto follows the CPUs)")


@pytest.mark.parametrize("kind", ["uint16-png", "int32-tiff", "float-tiff"])
def test_high_bit_depth_images_keep_their_contrast(tmp_path, kind):
    from caitlab.data import load_rgb

    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    arr, name = {"uint16-png": ((ramp * 65535).astype(np.uint16), "a.png"),
                 "int32-tiff": ((ramp * 4000 - 1000).astype(np.int32), "a.tiff"),
                 "float-tiff": (ramp.astype(np.float32), "a.tiff")}[kind]
    path = tmp_path / name
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode in ("I;16", "I", "F")
    rgb = np.asarray(load_rgb(str(path)))
    assert rgb.shape == (32, 32, 3)
    # the ramp stays a ramp from black to white (Pillow's own convert clips it to one colour)
    assert rgb[0, 0, 0] <= 2 and rgb[-1, -1, 0] >= 253
    assert abs(rgb.mean() - 127.5) < 3


# --------------------------------------------------------------- normalising on the device


def _first_batch(dm: ImageFolderDataModule, seed: int = 0):
    """The first training batch, as the model gets it (after the device's part)."""
    random.seed(seed), torch.manual_seed(seed), np.random.seed(seed)
    batch = next(iter(dm.train_dataloader()))
    return dm.on_after_batch_transfer(batch, 0)


def test_normalising_on_the_device_is_the_same_transform_moved(tmp_path):
    """uint8 batches from the workers (a quarter of the bytes), normalised after transfer:
    the images the model sees are those of the transform that normalises in the worker."""
    root = make_photo_folder(tmp_path, per_class=4, val=1)
    moved = folder_dm(root, reprob=0.0)
    moved.setup("fit")
    raw = next(iter(moved.train_dataloader()))[0]
    assert raw.dtype == torch.uint8 and raw.shape == (8, 3, 32, 32)
    in_worker = folder_dm(root, reprob=0.0, normalize_on_device=False)
    in_worker.setup("fit")
    x, y = _first_batch(moved)
    x_ref, y_ref = _first_batch(in_worker)
    assert x.dtype == x_ref.dtype == torch.float32
    assert torch.equal(y, y_ref)
    # the same crops and RandAugment draws; ToTensor's /255 then Normalize, against one step
    assert (x - x_ref).abs().max() < 1e-4
    assert x.abs().max() > 1  # normalised, not [0, 1]


def test_random_erasing_on_the_device_erases_at_its_rate(tmp_path):
    root = make_photo_folder(tmp_path, per_class=4, val=1)
    never, always = folder_dm(root, reprob=0.0), folder_dm(root, reprob=1.0)
    for dm in (never, always):
        dm.setup("fit")
    x0, _ = _first_batch(never)
    x1, _ = _first_batch(always)
    erased = (x1 != x0).flatten(1).any(1)
    assert erased.all()  # every image, with probability 1
    # const mode: the box is 0 in every channel (the mean colour once normalised)
    assert ((x1 == 0).all(1).flatten(1).sum(1) > 0).all()
    # evaluation batches come normalised from their transform: left as they are
    val = next(iter(always.val_dataloader()))
    assert always.on_after_batch_transfer(val, 0)[0] is val[0]


@pytest.mark.parametrize("remode", ["const", "pixel"])
def test_random_erasing_fills_the_box_as_its_mode_says(tmp_path, remode):
    """const: one value (0 once normalised); pixel (DeiT's): a normal draw per pixel."""
    dm = ImageFolderDataModule(root=str(make_image_folder(tmp_path)), num_classes=2,
                               img_size=32, batch_size=4, reprob=1.0, remode=remode)
    white = torch.full((4, 3, 32, 32), 255, dtype=torch.uint8)
    x, _ = dm.on_after_batch_transfer((white, torch.zeros(4, dtype=torch.long)), 0)
    for image in x:
        box = image[(image - image.amax(dim=(1, 2), keepdim=True)).abs() > 1e-3]
        assert box.numel() >= 3 * 16  # timm's smallest box: 2% of the image, in 3 channels
        if remode == "pixel":
            assert box.unique().numel() > 10  # normal draws, not one fill
        else:
            assert box.unique().tolist() == [0]


def test_repeated_augmentation_sampler_repeats_each_image_across_ranks(tmp_path):
    from torch.utils.data import DistributedSampler

    from caitlab.data.sampling import RepeatedAugSampler

    data = list(range(300))
    ranks = [RepeatedAugSampler(data, num_replicas=3, rank=r, seed=0, repeats=3)
             for r in range(3)]
    # a DistributedSampler: Lightning leaves it in place under DDP instead of wrapping it
    assert all(isinstance(s, DistributedSampler) for s in ranks)
    epoch = [list(s) for s in ranks]
    # DeiT's epoch length: the dataset rounded down to 256, over the ranks
    assert [len(e) for e in epoch] == [len(s) for s in ranks] == [85, 85, 85]
    # the three copies of an image go to three different ranks
    for i in set(epoch[0]):
        assert i in epoch[1] and i in epoch[2]
    assert len(set(epoch[0])) == len(epoch[0])
    for s in ranks:
        s.set_epoch(1)
    assert [list(s) for s in ranks] != epoch  # a new order each epoch
    other_seed = RepeatedAugSampler(data, num_replicas=3, rank=0, seed=1, repeats=3)
    assert list(other_seed) != epoch[0]  # and each seed its own


def test_repeated_augmentation_in_the_training_loader(tmp_path):
    root = make_photo_folder(tmp_path, per_class=4, val=1)
    dm = folder_dm(root, repeated_aug=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    alone = list(loader.sampler)
    # one process: each image three times in a row (DeiT's order), 16 images an epoch
    assert len(alone) == 16 and alone[0::3][:5] == alone[1::3][:5] == alone[2::3][:5]
    plain = folder_dm(root)
    plain.setup("fit")
    assert type(plain.train_dataloader().sampler).__name__ == "ShuffleSampler"
    with pytest.raises(DataConfigError, match="repeated_aug"):
        folder_dm(root, repeated_aug=0)


# ------------------------------------------------------------------------------ resuming


def make_colour_folder(root: Path, classes: int, per_class: int) -> Path:
    """``root/{train,val}/cNN/i.png``: every image one flat colour of its own. With one image
    per class, an image's label is its index. The training transform's random crops and flips
    leave a flat image as it is, so the batches a run trains on follow from the order alone."""
    for split, n in (("train", per_class), ("val", 2)):
        for c in range(classes):
            folder = root / split / f"c{c:02d}"
            folder.mkdir(parents=True)
            for i in range(n):
                colour = ((40 * c + 7 * i) % 256, 255 - 9 * i, 30 * c % 256)
                Image.new("RGB", (12 + i, 10 + c % 5), colour).save(folder / f"{i}.png")
    return root


def _labelled_dm(root: Path, ranks: tuple[int, int] | None = None, **kw):
    dm = folder_dm(root, **{"num_classes": 24, "batch_size": 4, "num_workers": 2, **kw})
    if ranks is not None:
        dm.trainer = SimpleNamespace(global_rank=ranks[0], world_size=ranks[1])
    dm.setup("fit")
    return dm


def _epoch(loader, epoch: int | None = None, batches: int | None = None) -> list[list[int]]:
    """The labels of an epoch's batches (the first ``batches``), the epoch set as Lightning
    sets it (None: not set, as on a resumed loader's first epoch)."""
    if epoch is not None and hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    it = iter(loader)
    return [next(it)[1].tolist() for _ in range(batches)] if batches else \
        [y.tolist() for _, y in it]


@pytest.mark.parametrize("ranks,kw", [
    (None, {}),
    ((0, 2), {}),  # DDP: each rank its shard
    ((1, 2), {}),
    (None, {"repeated_aug": 3}),
], ids=["one-process", "rank0-of-2", "rank1-of-2", "repeated-aug"])
def test_training_loader_stopped_mid_epoch_continues_with_its_next_batch(tmp_path, ranks, kw):
    """Stopped after two batches of the second epoch, its state saved (as a checkpoint holds
    it) and loaded into a fresh module: the new loader, with two workers, gives the rest of
    that epoch and then the next, the batches of a loader that never stopped."""
    root = make_colour_folder(tmp_path, classes=24, per_class=1)
    whole = _labelled_dm(root, ranks, **kw).train_dataloader()
    epochs = [_epoch(whole, e) for e in range(3)]
    assert len(epochs[1]) >= 3 and epochs[1] != epochs[0]

    stopped = _labelled_dm(root, ranks, **kw)
    loader = stopped.train_dataloader()
    _epoch(loader, 0)
    assert _epoch(loader, 1, batches=2) == epochs[1][:2]
    saved = tmp_path / "state.pt"
    torch.save(stopped.state_dict(), saved)

    resumed = _labelled_dm(root, ranks, **kw)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    loader = resumed.train_dataloader()
    assert _epoch(loader) == epochs[1][2:]
    assert _epoch(loader, 2) == epochs[2]


@pytest.mark.parametrize("ranks", [None, (1, 2)], ids=["one-process", "rank1-of-2"])
def test_training_loader_saved_at_an_epoch_end_continues_with_the_next_epoch(tmp_path, ranks):
    """Saved once its second epoch has ended (as that epoch's checkpoint is) and loaded into
    a fresh module: the new loader's first epoch is the third of a loader that never
    stopped."""
    root = make_colour_folder(tmp_path, classes=24, per_class=1)
    whole = _labelled_dm(root, ranks).train_dataloader()
    epochs = [_epoch(whole, e) for e in range(3)]

    stopped = _labelled_dm(root, ranks)
    loader = stopped.train_dataloader()
    assert [_epoch(loader, 0), _epoch(loader, 1)] == epochs[:2]
    saved = tmp_path / "state.pt"
    torch.save(stopped.state_dict(), saved)

    resumed = _labelled_dm(root, ranks)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    assert _epoch(resumed.train_dataloader()) == epochs[2]


@pytest.mark.parametrize("ranks,workers,batches", [
    (None, 0, None), (None, 2, None), (None, 0, 2), (None, 2, 1), ((0, 2), 2, None),
    ((1, 2), 0, None),
], ids=["no-workers", "two-workers", "no-workers-cut-short", "two-workers-cut-short",
        "rank0-of-2", "rank1-of-2"])
def test_training_order_is_the_one_runs_have_had(tmp_path, ranks, workers, batches):
    """The order runs have always trained in: torch's shuffle drawing from the loader's
    generator seeded with data.seed (the one its workers' seeds come from too), epochs read
    to their end or cut short; under DDP the DistributedSampler Lightning puts in, seeded with
    the same seed."""
    from timm.data.loader import fast_collate
    from torch.utils.data import DistributedSampler

    root = make_colour_folder(tmp_path, classes=24, per_class=1)
    dm = _labelled_dm(root, ranks, seed=5, num_workers=workers)
    if ranks is None:
        before = DataLoader(dm.train_set, batch_size=4, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(5),
                            collate_fn=fast_collate, num_workers=workers,
                            persistent_workers=workers > 0)
    else:
        before = DataLoader(dm.train_set, batch_size=4, drop_last=True,
                            sampler=DistributedSampler(dm.train_set, num_replicas=ranks[1],
                                                       rank=ranks[0], seed=5))
    ours = dm.train_dataloader()
    for epoch in range(3):
        assert _epoch(ours, epoch, batches) == _epoch(before, epoch, batches), epoch


# 24 training images in batches of 4: 6 batches an epoch, read by two loader workers. Flat
# images (make_colour_folder): the workers' own random draws leave them unchanged.
RESUMED = ("data=imagefolder", "data.num_classes=4", "data.batch_size=4", "data.num_workers=2",
           "data.auto_augment=none", "data.color_jitter=null", "model=vit_tiny",
           "model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2",
           "model.drop_path_rate=0.1", "trainer.max_epochs=3", "trainer.deterministic=true",
           "threads=1", "logger=csv",
           FAULTS_OUTSIDE_SIGNATURE)


@pytest.mark.slow
def test_image_folder_run_stopped_mid_epoch_resumes_to_identical_weights(tmp_path,
                                                                         forkserver):
    root = make_colour_folder(tmp_path / "images", classes=4, per_class=6)
    run_ = (*RESUMED, f"data.root={root}")
    ref_out, out = tmp_path / "ref", tmp_path / "int"
    ref_out.mkdir(), out.mkdir()
    forkserver.run(ref_out, *run_)

    stop = ("+callbacks.sig._target_=helpers.SignalAtStep", "+callbacks.sig.step=7")
    first = forkserver.run(out, *run_, *stop, check=False)
    assert first.returncode == 130, first.stderr[-3000:]
    (run,) = [p.parent for p in out.glob("*/*/summary.json")]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    # the signal came as step 7 started: stopped two batches into the second epoch
    assert ckpt["global_step"] == 8 and ckpt["epoch"] == 1

    forkserver.run(out, *run_)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["attempts"] == 2
    (ref_run,) = [p.parent for p in ref_out.glob("*/*/summary.json")]
    ref_weights, ref_step = last_weights(ref_run)
    weights, step = last_weights(run)
    assert step == ref_step == 18
    assert_same_weights(ref_weights, weights)
