"""Knowledge distillation as DeiT trains it (Touvron et al., 2021, Sec. 5): a frozen teacher's
predictions as a second target.

- ``soft``: KL divergence between the student's and the teacher's softened distributions
  (temperature ``tau``), scaled by ``tau^2``, over the batch and classes as DeiT's
  ``DistillationLoss`` computes it;
- ``hard``: cross-entropy against the teacher's argmax ("hard-label distillation").

The loss is ``(1 - alpha) * base + alpha * distillation``. A student with a distillation token
(``distillation_token=true``) learns the base loss through its class head and the teacher
through its distillation head (DeiT's "distillation through attention"); a student without
one learns both through its only head (classic knowledge distillation).

The teacher is a timm model by name, its weights read from a local file
(``teacher_weights``; never a hub), or a caitlab run folder or checkpoint. It is frozen, in
eval mode, outside the module's state (checkpoints do not carry it), and moved to the
student's device and dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from caitlab.config import ConfigError, DistillationConfig
from caitlab.models.checkpoint import (
    CheckpointError,
    load_file,
    load_run_model,
    resolve_checkpoint,
    run_folder,
    unwrap_state_dict,
)
from caitlab.record import read_summary


def soft_distillation(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """DeiT's soft term: ``KL(p_teacher || p_student)`` at temperature ``tau``, summed and
    divided by the logits' element count, times ``tau^2``."""
    return F.kl_div(F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1),
                    reduction="sum", log_target=True) * (tau * tau) / student.numel()


def hard_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(student, teacher.argmax(dim=1))


class DistillationLoss(nn.Module):
    """``base`` (the recipe's loss: smoothing, mixup targets) and the teacher's term."""

    def __init__(self, base: nn.Module | Any, kind: str, alpha: float, tau: float) -> None:
        super().__init__()
        self.base, self.kind, self.alpha, self.tau = base, kind, alpha, tau

    def forward(self, outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                targets: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        cls, dist = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        base = self.base(cls, targets)
        if self.kind == "none" or teacher_logits is None:
            return base
        teacher_logits = teacher_logits.detach().to(dist.dtype)
        if self.kind == "soft":
            term = soft_distillation(dist, teacher_logits, self.tau)
        else:
            term = hard_distillation(dist, teacher_logits)
        return base * (1 - self.alpha) + term * self.alpha


def load_teacher(cfg: DistillationConfig, in_chans: int, num_classes: int,
                 img_size: Any) -> nn.Module:
    """The frozen teacher ``cfg.teacher`` names, checked to predict the data's classes from
    the data's images."""
    source = str(cfg.teacher)
    if Path(source).exists():
        teacher = _caitlab_teacher(source)
    else:
        teacher = _timm_teacher(cfg, in_chans, num_classes)
    teacher.eval().requires_grad_(False)
    _check_fits(teacher, source, in_chans, num_classes, img_size)
    return teacher


def teacher_name(source: str) -> str:
    """How the report names a teacher: a timm model by its name, a caitlab run by its model
    and folder (``cait_tiny@6db055c9e0``, from the run's summary), a checkpoint file by its
    file name."""
    path = Path(source)
    if not path.exists():
        return source
    try:
        folder = run_folder(resolve_checkpoint(path))
    except Exception:  # noqa: BLE001 - a name for a table; loading says what is wrong
        return path.name
    model = ((read_summary(folder) or {}).get("model") or {}).get("name")
    return f"{model}@{folder.name}" if model else path.name


def _caitlab_teacher(source: str) -> nn.Module:
    try:
        model, _ = load_run_model(source)
    except CheckpointError as err:
        raise ConfigError(f"distillation.teacher={source}: {err}") from None
    return model


def _timm_teacher(cfg: DistillationConfig, in_chans: int, num_classes: int) -> nn.Module:
    name = str(cfg.teacher)
    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:6]}*")[:3]
        hint = f"; timm has e.g. {', '.join(close)}" if close else ""
        raise ConfigError(f"distillation.teacher={name}: neither a file or run folder nor a "
                        f"timm model name{hint}")
    if not cfg.teacher_weights:
        raise ConfigError(f"distillation.teacher={name}: set distillation.teacher_weights to a "
                        "local file of its weights (caitlab never downloads them)")
    weights = Path(cfg.teacher_weights)
    if not weights.is_file():
        raise ConfigError(f"distillation.teacher_weights={weights}: no such file")
    model = timm.create_model(name, pretrained=False, in_chans=in_chans,
                              num_classes=num_classes, **dict(cfg.teacher_kwargs or {}))
    try:
        state = unwrap_state_dict(load_file(weights), str(weights))
    except CheckpointError as err:
        raise ConfigError(f"distillation.teacher_weights: {err}") from None
    fit = f"distillation.teacher_weights={weights} does not fit timm's {name}"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes: torch lists every mismatch, one line is kept
        lines = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln]
        raise ConfigError(f"{fit}: {lines[0] if lines else str(err)[:200]}") from None
    if missing or unexpected:
        raise ConfigError(f"{fit}: {len(missing)} missing keys (e.g. "
                          f"{', '.join(missing[:2])}), {len(unexpected)} unexpected (e.g. "
                          f"{', '.join(unexpected[:2])})")
    return model


def _check_fits(teacher: nn.Module, source: str, in_chans: int, num_classes: int,
                img_size: Any) -> None:
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    try:
        with torch.no_grad():
            out = teacher(torch.zeros(1, in_chans, *size))
    except Exception as err:  # noqa: BLE001 - whatever the teacher's own forward raises
        raise ConfigError(f"distillation.teacher={source} cannot take the data's "
                        f"{in_chans}x{size[0]}x{size[1]} images: {type(err).__name__}: "
                        f"{str(err).splitlines()[0][:160]}") from None
    if isinstance(out, tuple):
        out = out[0]
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise ConfigError(f"distillation.teacher={source} predicts {tuple(out.shape[1:])} "
                        f"outputs, the data has {num_classes} classes")
