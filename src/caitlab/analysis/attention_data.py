"""What ``caitlab-attention`` feeds the model: its checkpoint, the run's data and the images.

The model comes from a caitlab checkpoint (file or run folder); what the run trained on from
its run folder (``summary.json``'s ``data``, ``config.yaml``'s ``data`` node), which decides
whether ``--digits`` applies and how the predicted classes are named. Images are digits test
images (the run's own split) or image files, converted to the model's channels and size and
normalised.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torchvision.datasets
from omegaconf import OmegaConf
from PIL import Image, UnidentifiedImageError

from caitlab.analysis.attention_maps import AttentionError
from caitlab.models import ImageTransformer
from caitlab.models.checkpoint import CheckpointError, load_run_model, run_folder
from caitlab.record import data_choice, read_summary

if TYPE_CHECKING:
    from caitlab.data import DigitsDataModule

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_model(path: str | Path) -> tuple[ImageTransformer, Path]:
    """The model of a caitlab checkpoint (file or run folder), in eval mode, and the file:
    :func:`caitlab.models.checkpoint.load_run_model`, its failures as this tool's."""
    try:
        return load_run_model(path)
    except CheckpointError as err:
        raise AttentionError(str(err)) from None


# --- the run's data ------------------------------------------------------------------------

def run_data_config(ckpt: Path) -> dict | None:
    """The ``data`` node of the config the checkpoint's run was trained with (its run
    folder's ``config.yaml``), or None for a checkpoint outside a run folder."""
    path = run_folder(ckpt) / "config.yaml"
    if not path.is_file():
        return None
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path))
        data = loaded.get("data") if isinstance(loaded, dict) else None
    except Exception:  # an unreadable config.yaml only costs the checks it allows
        return None
    return data if isinstance(data, dict) else None


def data_option(ckpt: Path, data: dict | None) -> str | None:
    """``digits``, ``imagefolder``...: the ``data=`` choice the checkpoint's run trained with,
    as its summary records it, else by the datamodule class its ``config.yaml`` names
    (``caitlab.record.data_choice``). ``digits`` too for a project's own
    option over caitlab's digits (``data``, the run's data config, names
    ``DigitsDataModule``). None for a checkpoint outside a run folder."""
    if data is not None and str(data.get("_target_", "")).endswith(".DigitsDataModule"):
        return "digits"
    folder = run_folder(ckpt)
    recorded = (read_summary(folder) or {}).get("data")
    return recorded if isinstance(recorded, str) and recorded else data_choice(folder)


def class_names(data: dict | None, option: str | None, num_classes: int) -> list[str] | None:
    """The names of the classes the model predicts, where the run's data has them: the
    digits themselves, an ImageFolder's class folders, CIFAR's label names. ``option``: the
    run's :func:`data_option`, ``data`` its data config."""
    names: list[str] | None = None
    root = Path(str(data["root"])).expanduser() if data and data.get("root") else None
    if option == "digits":
        names = [str(i) for i in range(10)]
    elif option == "imagefolder" and root is not None:
        from caitlab.data import find_class_folders  # caitlab.data imports lightning

        names = find_class_folders(root / "train") if (root / "train").is_dir() else None
    elif option in ("cifar10", "cifar100") and root is not None:
        names = _cifar_classes(root, option)
    return names if names is not None and len(names) == num_classes else None


def _cifar_classes(root: Path, option: str) -> list[str] | None:
    cls = torchvision.datasets.CIFAR10 if option == "cifar10" else torchvision.datasets.CIFAR100
    meta = root / cls.base_folder / cls.meta["filename"]
    try:  # read as torchvision reads it (CIFAR10._load_meta), without loading the images
        with open(meta, "rb") as f:
            return [str(n) for n in pickle.load(f, encoding="latin1")[cls.meta["key"]]]
    except (OSError, pickle.UnpicklingError, KeyError, EOFError, TypeError):
        return None


# --- the images ----------------------------------------------------------------------------


def _img_size(model: ImageTransformer) -> tuple[int, int]:
    return tuple(model.patch_embed.img_size)


def _digits_module(model: ImageTransformer, data: dict | None = None) -> DigitsDataModule:
    from caitlab.data import DigitsDataModule  # caitlab.data imports lightning

    h, w = _img_size(model)
    if h != w:
        raise AttentionError(f"--digits needs a square model input, this one is {h}x{w}")
    if model.patch_embed.proj.in_channels not in (1, 3):
        raise AttentionError("--digits needs a model with 1 or 3 input channels")
    # the run's own split: its test images are the ones the indices name
    split = {k: data[k] for k in ("val_fraction", "test_fraction") if data and k in data}
    dm = DigitsDataModule(img_size=h, in_chans=model.patch_embed.proj.in_channels, **split)
    dm.setup()
    return dm


def load_digits(
    model: ImageTransformer, indices: Sequence[int], data: dict | None = None
) -> tuple[torch.Tensor, list[str], list[int], tuple[float, ...], tuple[float, ...]]:
    """Digits test images for ``model``: (images, names, labels, mean, std). ``data``: the
    run's data config, when known (its split)."""
    dm = _digits_module(model, data)
    x, y = dm.tensors["test"]
    bad = [i for i in indices if not 0 <= i < len(x)]
    if bad:
        raise AttentionError(f"--digits {bad[0]} is out of range: the test split has "
                             f"{len(x)} images (0..{len(x) - 1})")
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    assert dm.mean is not None and dm.std is not None  # set up (_digits_module)
    return (x[idx], [f"digit{i}" for i in indices], [int(v) for v in y[idx]],
            (dm.mean,), (dm.std,))


def default_mean_std(model: ImageTransformer) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation of ``--images`` without ``--mean``/``--std``: ImageNet's for a
    3-channel model, the digits' for a square 1-channel one."""
    chans = model.patch_embed.proj.in_channels
    if chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if chans == 1:
        dm = _digits_module(model) if len(set(_img_size(model))) == 1 else None
        if dm is not None:
            assert dm.mean is not None and dm.std is not None  # set up (_digits_module)
            return (dm.mean,), (dm.std,)
    raise AttentionError(f"no default --mean/--std for a {chans}-channel model: give them")


def load_image_files(
    model: ImageTransformer, paths: Sequence[str | Path],
    mean: Sequence[float], std: Sequence[float],
) -> tuple[torch.Tensor, list[str]]:
    """Image files converted to the model's channels and size, normalised: (images, stems)."""
    chans = model.patch_embed.proj.in_channels
    if chans not in (1, 3):
        raise AttentionError(f"image files need a 1- or 3-channel model, this one has {chans}")
    mean_t = per_channel(mean, chans, "--mean")
    std_t = per_channel(std, chans, "--std")
    if (std_t <= 0).any():
        raise AttentionError("--std must be positive")
    h, w = _img_size(model)
    out, names, used = [], [], set()
    for p in map(Path, paths):
        if not p.is_file():
            raise AttentionError(f"image not found: {p}")
        try:
            with Image.open(p) as file:
                img = file.convert("L" if chans == 1 else "RGB")
                img = img.resize((w, h), Image.Resampling.BILINEAR)
                t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        except (UnidentifiedImageError, OSError) as err:
            raise AttentionError(f"{p} is not a readable image: {err}") from None
        t = t.view(h, w, chans).permute(2, 0, 1).float() / 255.0
        out.append((t - mean_t[:, None, None]) / std_t[:, None, None])
        name, k = p.stem, 2
        while name in used:  # two files with the same stem must not overwrite each other
            name, k = f"{p.stem}_{k}", k + 1
        used.add(name)
        names.append(name)
    return torch.stack(out), names


def per_channel(values: Sequence[float], chans: int, flag: str) -> torch.Tensor:
    """``values`` (``--mean``/``--std``: one, or one per channel) as a (chans,) tensor."""
    if len(values) not in (1, chans):
        raise AttentionError(f"{flag} takes 1 or {chans} values, got {len(values)}")
    t = torch.tensor([float(v) for v in values])
    return t.expand(chans).clone()
