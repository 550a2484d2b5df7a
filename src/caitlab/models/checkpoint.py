"""Loading timm and official DeiT/CaiT checkpoints into ``ImageTransformer``.

Accepted files: a bare state dict of timm's ``cait_*``, ``deit_*`` or ``vit_*`` models (or of
ours), the official release format ``{"model": state_dict}`` (keys possibly prefixed with
``module.``), and Lightning checkpoints written by caitlab (``{"state_dict": ...}`` with keys
under ``model.``, then ``_orig_mod.`` for a ``compile=true`` run). Everything is checked
before a single tensor is copied.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import cast

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from caitlab.models.cait import ImageTransformer
from caitlab.models.spec import ModelConfigError


class CheckpointError(RuntimeError):
    """A file that is not a checkpoint, or one that does not fit the model."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a checkpoint file (``weights_only``: no code runs) and unwraps its state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return unwrap_state_dict(load_file(path), str(path))


# What torch.save writes: a zip archive (torch >= 1.6), or a pickle (the legacy format).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def load_file(path: str | Path) -> object:
    """``torch.load(path, weights_only=True)`` (no code runs), its failures in one line naming
    the file: torch's own message for a text file is a bare ``KeyError: '101'``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load's failures on foreign bytes take many types
        raise CheckpointError(f"{path} {_unreadable(Path(path), err)}") from None


def _unreadable(path: Path, err: Exception) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as read_err:
        return f"cannot be read: {read_err.strerror or read_err}"
    if not head:
        return "is not a checkpoint: the file is empty"
    if not head.startswith(_TORCH_MAGIC):
        # the 64 bytes read may end inside a character
        text = (head[:-3] if len(head) == 64 else head).decode("utf-8", "replace")
        if all(c.isprintable() or c.isspace() for c in text.replace("\ufffd", "\0")):
            start = " ".join(text.split())[:30]
            return f"is not a checkpoint: it is a text file (starting {start!r})"
        return "is not a checkpoint: torch.save writes a zip archive or a pickle, it is neither"
    message = str(err)
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    if unsafe:
        return (f"is not a readable checkpoint: it holds a Python object ({unsafe.group(1)}) "
                "that loading would run; only tensors and plain data are read")
    first = " ".join(message.split(". ")[0].split())[:120] or type(err).__name__
    return f"is not a readable checkpoint (torn or corrupt?): {type(err).__name__}: {first}"


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    prefix = ""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj, prefix = obj["state_dict"], "model."  # a caitlab Lightning checkpoint
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # official DeiT/CaiT release
    if not isinstance(obj, dict) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"{source} holds no state dict of tensors")
    out = {}
    for key, value in obj.items():
        if prefix and key.startswith(prefix):
            key = key[len(prefix):]
        elif prefix:
            continue  # e.g. the EMA copy or loss buffers beside the model
        out[_unwrapped_key(key)] = value
    return out


# What wrappers put before every key: DistributedDataParallel (``module.``, also in the
# official release) and torch.compile (``_orig_mod.``, a ``compile=true`` run's checkpoints).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _unwrapped_key(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):  # wrappers nest: DDP around a compiled model
        key = key.split(".", 1)[1]
    return key


def _grid(n: int) -> tuple[int, int] | None:
    r = math.isqrt(n)
    return (r, r) if r * r == n else None


def remap_state_dict(
    state_dict: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Renames timm/official keys to ours and resamples the position embedding (and static
    keys) to the model's grid."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key.replace("blocks_token_only.", "ca_blocks.")  # timm Cait class attention
        key = key.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        out[key] = value

    pos = out.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pos is not None and target is not None and pos.ndim == 3:
        n = pos.shape[1]
        tokens = [t for t in ("cls_token", "dist_token") if t in out]
        if _grid(n) is None and tokens and _grid(n - len(tokens)) is not None:
            # timm ViT/DeiT embed the class (and distillation) token's position too; it is a
            # constant added to the token, so folding it in gives the same function.
            for i, token in enumerate(tokens):
                out[token] = out[token] + pos[:, i:i + 1]
            pos = pos[:, len(tokens):]
        # the model's own (H, W): nn.Module types attributes it does not know as Tensor | Module
        grid = tuple(cast(tuple[int, int], model.grid_size))
        src = _grid(pos.shape[1])
        if src is not None and src != grid and pos.shape[-1] == target.shape[-1]:
            pos = resample_abs_pos_embed(pos, list(grid), list(src), num_prefix_tokens=0)
        out["pos_embed"] = pos
    for key in [k for k in out if k.endswith(".attn.static_key")]:
        out[key] = _resample_static_key(out[key], model, key)
    return out


def _resample_static_key(keys: torch.Tensor, model: nn.Module, name: str) -> torch.Tensor:
    """Static-key attention keeps one key per token position, (heads, tokens, head_dim): like
    the position embedding, its patch part is resampled over the grid when the image size
    differs (the class token's key, first where the layer has one, is kept as it is)."""
    try:
        target = model.get_parameter(name)
    except AttributeError:
        return keys  # not in this model: check_state_dict names it
    grid = tuple(getattr(model, "grid_size", ()))
    if keys.ndim != 3 or target.ndim != 3 or len(grid) != 2 or keys.shape == target.shape:
        return keys
    prefix = target.shape[1] - grid[0] * grid[1]
    src = _grid(keys.shape[1] - prefix)
    if prefix not in (0, 1) or src is None or (keys.shape[0], keys.shape[2]) != (
            target.shape[0], target.shape[2]):
        return keys  # another architecture: check_state_dict reports the shapes
    heads, n, dim = keys.shape
    flat = keys.permute(1, 0, 2).reshape(1, n, heads * dim)
    flat = resample_abs_pos_embed(flat, list(grid), list(src), num_prefix_tokens=prefix)
    return flat.reshape(-1, heads, dim).permute(1, 0, 2).contiguous()


def check_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
    if unexpected:
        problems.append(
            f"unexpected {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else "")
        )
    if wrong:
        problems.append(f"shape {'; '.join(wrong[:3])}" + (" ..." if len(wrong) > 3 else ""))
    if problems:
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__} "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrong shape): "
            + " | ".join(problems)
        )


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Loads ``path`` into ``model`` in place, all or nothing; returns the model."""
    return load_state(model, read_state_dict(path), str(path))


def load_state(model: nn.Module, obj: object, source: str) -> nn.Module:
    """Loads a checkpoint already read (``load_file``'s object, or a state dict) into
    ``model`` in place, all or nothing; ``source`` names it in errors. Returns the model."""
    state_dict = remap_state_dict(unwrap_state_dict(obj, source), model)
    check_state_dict(state_dict, model, source)
    model.load_state_dict(state_dict, strict=True)
    return model


# --- a caitlab run's model -------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or a run folder's ``checkpoints/best.ckpt`` (else
    ``last.ckpt``)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for sub in ("checkpoints/best.ckpt", "checkpoints/last.ckpt", "best.ckpt", "last.ckpt"):
            if (path / sub).is_file():
                return path / sub
        raise CheckpointError(f"no checkpoints/best.ckpt or checkpoints/last.ckpt in {path}")
    raise CheckpointError(f"checkpoint not found: {path}")


def run_folder(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def model_from_config(config: dict) -> nn.Module:
    """Rebuilds an ``ImageTransformer`` from its ``config`` (as saved in caitlab checkpoints)."""
    cfg = dict(config)
    for key in ("img_size", "patch_size"):
        if isinstance(cfg.get(key), list):
            cfg[key] = tuple(cfg[key])
    if cfg.get("layerscale_init") is None:  # saved as None when residual != layerscale
        cfg.pop("layerscale_init", None)
    return ImageTransformer(**cfg)


def load_run_model(path: str | Path) -> tuple[nn.Module, Path]:
    """The model of a caitlab checkpoint (file, or a run folder's best), rebuilt from the
    config the checkpoint carries, in eval mode; and the file read."""
    ckpt = resolve_checkpoint(path)
    obj = load_file(ckpt)
    config = obj.get("caitlab", {}).get("model_config") if isinstance(obj, dict) else None
    if not isinstance(config, dict):
        raise CheckpointError(f"{ckpt} is not a caitlab checkpoint (no caitlab.model_config "
                              "to rebuild the model from)")
    try:
        model = model_from_config(config)
    except (ModelConfigError, TypeError) as err:
        raise CheckpointError(f"{ckpt}: cannot rebuild the model from its config: {err}"
                              ) from None
    load_state(model, obj, str(ckpt))
    return model.eval(), ckpt


def checkpoint_is_readable(path: Path) -> bool:
    """Whether torch can load ``path`` (memory-mapped: the tensors are not read)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return True
    except Exception:
        return False


def resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint that loads: ``last.ckpt``, or, if that one is broken, the next
    newest (``best.ckpt``), with a warning. A folder whose checkpoints are all broken is an
    error: starting over silently would throw away the run's history."""
    candidates = sorted((p for p in Path(ckpt_dir).glob("*.ckpt") if p.is_file()),
                        key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"), reverse=True)
    broken: list[Path] = []
    for path in candidates:
        if checkpoint_is_readable(path):
            if broken:
                warnings.warn(f"{', '.join(map(str, broken))} cannot be read; resuming from "
                              f"{path} instead", stacklevel=2)
            return path
        broken.append(path)
    if broken:
        names = ", ".join(p.name for p in broken)
        raise ResumeError(f"no readable checkpoint in {ckpt_dir} ({names} broken): "
                          "move them away to start this run over")
    return None


class ResumeError(RuntimeError):
    """A run folder whose checkpoints are all broken: resuming would have nothing to start
    from, and starting over would throw its history away."""
