"""Where the class token looks, per layer and per head (``caitlab-attention`` draws it).

For a CaiT-style model (``class_token=class_attention``) the maps are the class-attention
weights of every head of every class-attention (CA) layer, as visualised in "Going deeper with
image transformers". For a model whose class token takes part in self-attention (``input``,
ViT/DeiT, or ``insert``) they are the class token's attention row in the last ``N`` self-
attention (SA) layers. A model without a class token (``none``) has nothing to show.

One PNG per image (``attention_digit17.png``, ``attention_<file stem>.png``): the input in
the first column, then one row per layer and one column per head, each map upsampled to the
image and overlaid on it, normalised per map (min to max).

Talking-heads layers: the SA maps are the weights that multiply V, i.e. after the post-softmax
head mixing (``proj_w``). Those are linear mixtures of softmax rows, so they need not sum to 1
per head and may be negative; everywhere else the weights over all tokens sum to 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from caitlab.models import ImageTransformer
from caitlab.models.checkpoint import CheckpointError, load_run_model, run_folder
from caitlab.models.layers import Attention

if TYPE_CHECKING:
    from caitlab.data import DigitsDataModule

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class AttentionError(ValueError):
    """Something the user gave cannot be visualised; the message says what."""


@dataclass
class LayerAttention:
    """The class token's attention in one layer.

    ``weights``: (batch, heads, tokens) over every token the layer sees, the class token at
    index 0 (sums to 1 per head, except after talking-heads mixing). ``maps``: the same
    weights over the patch tokens only, on the patch grid: (batch, heads, gh, gw).
    """

    name: str
    weights: torch.Tensor
    maps: torch.Tensor


@dataclass
class AttentionTrace:
    """The per-layer attention plus what the model computed on the way.

    ``tokens`` are ``[cls, patches]`` just before ``model.norm`` (what ``forward_features``
    normalises), ``logits`` the model's output for the same images.
    """

    layers: list[LayerAttention]
    tokens: torch.Tensor
    logits: torch.Tensor


# --- the maps ------------------------------------------------------------------------------


def class_row_attention(attn: Attention, u: torch.Tensor) -> torch.Tensor:
    """The class token's (index 0) weights over all tokens in ``attn`` for the normed input ``u``.

    Returns (batch, heads, tokens): ``softmax(q_cls k^T * scale)``, with the talking-heads
    mixing before (``proj_l``) and after (``proj_w``) the softmax when the layer has it, so
    that the result is exactly the row that multiplies V. Static-key layers use their learned
    keys. This is the row EViT token reorganisation ranks tokens by.
    """
    q, k, _ = attn.qkv_heads(u)
    return attn.class_row(q, k)


def _layer(name: str, weights: torch.Tensor, grid: tuple[int, int],
           positions: torch.Tensor) -> LayerAttention:
    """``positions``: (batch, tokens - 1), the grid cell of each non-class token, -1 for a
    token fused by EViT; cells whose token was dropped stay 0 in the map."""
    b, h, _ = weights.shape
    patch_weights = weights[:, :, 1:] * (positions >= 0)[:, None]
    maps = weights.new_zeros(b, h, grid[0] * grid[1]).scatter_add_(
        2, positions.clamp(min=0)[:, None].expand(-1, h, -1), patch_weights)
    return LayerAttention(name=name, weights=weights, maps=maps.view(b, h, *grid))


def trace_attention(model: ImageTransformer, images: torch.Tensor,
                    last_layers: int = 2) -> AttentionTrace:
    """Runs ``model`` on ``images`` (eval mode, no grad) through its ``forward_attention``,
    keeping the class token's attention: every CA layer for ``class_attention`` models, the
    last ``last_layers`` SA layers that contain the class token for ``input``/``insert`` ones.

    After an EViT reorganising layer the maps follow each kept token back to its grid cell:
    dropped patches are 0, and the fused token is left out of the maps (its weight stays in
    ``weights``).
    """
    if not hasattr(model, "forward_attention"):  # (a torch.compile wrapper forwards it)
        raise AttentionError(f"{type(model).__name__} is not a caitlab ImageTransformer")
    if model.cls_token is None:
        raise AttentionError("no class token to visualise (class_token=none: the model "
                             "average-pools its patch tokens)")
    if last_layers < 1:
        raise AttentionError(f"--last-layers must be at least 1, got {last_layers}")
    grid = tuple(model.grid_size)
    depth = len(model.blocks)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            tokens, attention = model.forward_attention(
                images, range(max(0, depth - last_layers), depth))
            logits = model.forward_head(model.norm(tokens))
            layers = [_layer(a.name, a.weights, grid, a.positions) for a in attention]
    finally:
        model.train(was_training)
    # clones made outside inference mode are ordinary tensors, usable anywhere afterwards
    layers = [LayerAttention(la.name, la.weights.clone(), la.maps.clone()) for la in layers]
    return AttentionTrace(layers=layers, tokens=tokens.clone(), logits=logits.clone())


def attention_maps(model: ImageTransformer, images: torch.Tensor,
                   last_layers: int = 2) -> list[LayerAttention]:
    """Per layer (``ca.<i>`` or ``sa.<i>``, in forward order): name, the class token's
    weights over all tokens (batch, heads, tokens) and its patch maps (batch, heads, gh, gw).
    """
    return trace_attention(model, images, last_layers).layers


def upsample_maps(maps: torch.Tensor, size: tuple[int, int],
                  mode: str = "bilinear") -> torch.Tensor:
    """(batch, heads, gh, gw) -> (batch, heads, H, W) with ``F.interpolate``."""
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(maps.float(), size=size, mode=mode, **kwargs)


# --- loading -------------------------------------------------------------------------------


def load_model(path: str | Path) -> tuple[ImageTransformer, Path]:
    """The model of a caitlab checkpoint (file or run folder), in eval mode, and the file:
    :func:`caitlab.models.checkpoint.load_run_model`, its failures as this tool's."""
    try:
        return load_run_model(path)
    except CheckpointError as err:
        raise AttentionError(str(err)) from None


# The data modules of caitlab's data= options, by the class name config.yaml records.
DATA_OPTIONS = {"DigitsDataModule": "digits", "ImageFolderDataModule": "imagefolder",
                "Cifar10DataModule": "cifar10", "Cifar100DataModule": "cifar100",
                "SyntheticDataModule": "synthetic"}


def run_data_config(ckpt: Path) -> dict | None:
    """The ``data`` node of the config the checkpoint's run was trained with (its run
    folder's ``config.yaml``), or None for a checkpoint outside a run folder."""
    path = run_folder(ckpt) / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path))
        data = loaded.get("data") if isinstance(loaded, dict) else None
    except Exception:  # an unreadable config.yaml only costs the checks it allows
        return None
    return data if isinstance(data, dict) else None


def data_option(data: dict) -> str:
    """``digits``, ``imagefolder``... as the run's ``data=`` chose it (else the class name)."""
    name = str(data.get("_target_", "")).rsplit(".", 1)[-1]
    return DATA_OPTIONS.get(name, name or "unknown")


def class_names(data: dict | None, num_classes: int) -> list[str] | None:
    """The names of the classes the model predicts, where the run's data has them: the
    digits themselves, an ImageFolder's class folders, CIFAR's label names."""
    if data is None:
        return None
    option = data_option(data)
    names: list[str] | None = None
    if option == "digits":
        names = [str(i) for i in range(10)]
    elif option == "imagefolder" and data.get("root"):
        from caitlab.data import find_class_folders

        train = Path(str(data["root"])).expanduser() / "train"
        names = find_class_folders(train) if train.is_dir() else None
    elif option in ("cifar10", "cifar100") and data.get("root"):
        names = _cifar_classes(Path(str(data["root"])).expanduser(), option)
    return names if names is not None and len(names) == num_classes else None


def _cifar_classes(root: Path, option: str) -> list[str] | None:
    import pickle

    import torchvision.datasets

    cls = torchvision.datasets.CIFAR10 if option == "cifar10" else torchvision.datasets.CIFAR100
    meta = root / cls.base_folder / cls.meta["filename"]
    try:  # read as torchvision reads it (CIFAR10._load_meta), without loading the images
        with open(meta, "rb") as f:
            return [str(n) for n in pickle.load(f, encoding="latin1")[cls.meta["key"]]]
    except (OSError, pickle.UnpicklingError, KeyError, EOFError, TypeError):
        return None


def _img_size(model: ImageTransformer) -> tuple[int, int]:
    return tuple(model.patch_embed.img_size)


def _digits_module(model: ImageTransformer, data: dict | None = None) -> DigitsDataModule:
    from caitlab.data import DigitsDataModule

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
    from PIL import Image, UnidentifiedImageError

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
    if len(values) not in (1, chans):
        raise AttentionError(f"{flag} takes 1 or {chans} values, got {len(values)}")
    t = torch.tensor([float(v) for v in values])
    return t.expand(chans).clone()


# --- plotting ------------------------------------------------------------------------------


def _pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_attention(image: torch.Tensor, layers: Sequence[LayerAttention], index: int,
                   path: str | Path, title: str | None = None, mode: str = "bilinear",
                   alpha: float = 0.5, cmap: str = "jet") -> Path:
    """One PNG: ``image`` (C, H, W, values in [0, 1]) in the first column, then per layer a
    row with each head's map of sample ``index``, upsampled to H x W and overlaid."""
    plt = _pyplot()
    path = Path(path)
    c, h, w = image.shape
    shown = image.clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    base = dict(cmap="gray", vmin=0, vmax=1) if c == 1 else {}
    if c == 1:
        shown = shown[..., 0]
    heads = max(layer.maps.shape[1] for layer in layers)
    rows, cols = len(layers), heads + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.0 * rows + 0.4), squeeze=False)
    try:
        for r, layer in enumerate(layers):
            up = upsample_maps(layer.maps[index:index + 1], (h, w), mode)[0]
            axes[r, 0].imshow(shown, interpolation="nearest", **base)
            axes[r, 0].set_title("input" if r == 0 else "", fontsize=9)
            axes[r, 0].set_ylabel(layer.name, fontsize=10)
            for head in range(heads):
                ax = axes[r, head + 1]
                if head < up.shape[0]:
                    m = up[head]
                    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
                    ax.imshow(shown, interpolation="nearest", **base)
                    ax.imshow(m.cpu().numpy(), cmap=cmap, alpha=alpha, vmin=0, vmax=1,
                              interpolation="nearest")
                    ax.set_title(f"{layer.name} / head {head}", fontsize=9)
                else:
                    ax.set_visible(False)
            for ax in axes[r]:
                ax.set_xticks([])
                ax.set_yticks([])
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
