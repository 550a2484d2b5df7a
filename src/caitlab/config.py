"""Typed training config: the recipe pieces the Lightning module reads.

Hydra composes plain YAML; these dataclasses check it (unknown keys, wrong types, impossible
values) and give the module attribute access with defaults in one place.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# The package's own configs (shipped in the wheel); a project adds its own through ./conf
# (hydra.searchpath in train.yaml), --config-dir or hydra.searchpath=[...].
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def shadowed_options(sources: Any) -> list[tuple[Path, Path]]:
    """(a project's option file, caitlab's of the same group and name) for each option in
    ``sources`` (``hydra.runtime.config_sources``) that caitlab ships too. Hydra reads
    caitlab's, found first, and would ignore the project's without a word.

    Parameters:
        sources: the config sources of the running Hydra job (their ``schema`` and ``path``).
    Returns:
        The pairs, in a stable order; empty when nothing is shadowed.
    """
    ours = Path(CONF_DIR)
    found = []
    for source in sources or ():
        if source.get("schema") != "file" or not source.get("path"):
            continue
        folder = Path(source["path"]).resolve()
        # caitlab's own, or another copy of it (a sweep's job runs from a code snapshot)
        if folder == ours or not folder.is_dir() or (
                folder.name == "conf" and folder.parent.name == "caitlab"
                and (folder / "train.yaml").is_file()):
            continue
        for path in sorted(folder.rglob("*.yaml")):
            rel = path.relative_to(folder)
            if len(rel.parts) > 1 and (ours / rel).is_file():
                found.append((path, ours / rel))
    return found


class ConfigError(ValueError):
    """A user error in the config: one line that names the key, the value and what is allowed."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 5e-4  # at a global batch of 512 when scale_lr (DeiT)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    scale_lr: bool = True  # lr * global_batch / 512, as in DeiT
    clip_grad: float | None = None  # max gradient norm; None: no clipping
    fused: bool | None = None  # fused AdamW kernels; None: fused on GPU, torch's default on CPU

    def validate(self) -> None:
        _require(self.lr > 0, "optim.lr", self.lr, "> 0")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        _require(self.eps > 0, "optim.eps", self.eps, "> 0")
        _require(self.name in ("adamw", "sgd", "lamb"), "optim.name", self.name,
                 "one of adamw, sgd, lamb")
        _require(self.clip_grad is None or self.clip_grad > 0, "optim.clip_grad",
                 self.clip_grad, "null or > 0")


@dataclass
class SchedConfig:
    name: str = "cosine"
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5

    def validate(self) -> None:
        _require(self.name in ("cosine", "constant"), "sched.name", self.name,
                 "one of cosine, constant")
        _require(self.warmup_epochs >= 0, "sched.warmup_epochs", self.warmup_epochs, ">= 0")
        _require(self.min_lr >= 0, "sched.min_lr", self.min_lr, ">= 0")
        _require(self.warmup_lr >= 0, "sched.warmup_lr", self.warmup_lr, ">= 0")


@dataclass
class RecipeConfig:
    """Loss and batch-level augmentation (DeiT: smoothing 0.1, mixup 0.8, cutmix 1.0)."""

    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    max_nonfinite_steps: int = 0  # non-finite losses skipped before a run counts as diverged

    def validate(self) -> None:
        _require(0 <= self.label_smoothing < 1, "recipe.label_smoothing",
                 self.label_smoothing, "in [0, 1)")
        _require(self.mixup >= 0, "recipe.mixup", self.mixup, ">= 0")
        _require(self.cutmix >= 0, "recipe.cutmix", self.cutmix, ">= 0")
        _require(0 <= self.mixup_prob <= 1, "recipe.mixup_prob", self.mixup_prob, "in [0, 1]")
        _require(self.max_nonfinite_steps >= 0, "recipe.max_nonfinite_steps",
                 self.max_nonfinite_steps, ">= 0")

    @property
    def mixes(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


DISTILLATION_TYPES = ("none", "soft", "hard")


@dataclass
class DistillationConfig:
    """DeiT's distillation from a frozen teacher (:mod:`caitlab.training.distillation`):
    ``type`` none, soft (KL at temperature ``tau``) or hard (the teacher's argmax), weighted
    ``alpha`` against the recipe's loss. ``teacher``: a caitlab run folder or checkpoint, or
    a timm model name with its weights in the local file ``teacher_weights`` (and
    ``teacher_kwargs`` for ``timm.create_model``)."""

    type: str = "none"
    alpha: float = 0.5
    tau: float = 1.0
    teacher: str | None = None
    teacher_weights: str | None = None
    teacher_kwargs: dict | None = None

    def validate(self) -> None:
        if self.type not in DISTILLATION_TYPES:
            close = difflib.get_close_matches(str(self.type), DISTILLATION_TYPES, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"distillation.type={self.type!r} is not allowed: must be one of "
                              f"{', '.join(DISTILLATION_TYPES)}{hint}")
        _require(0 <= self.alpha <= 1, "distillation.alpha", self.alpha, "in [0, 1]")
        _require(self.tau > 0, "distillation.tau", self.tau, "> 0")
        if self.type != "none" and not self.teacher:
            raise ConfigError(f"distillation.type={self.type} needs distillation.teacher: a "
                              "caitlab run folder or checkpoint, or a timm model name with "
                              "distillation.teacher_weights")

    @property
    def active(self) -> bool:
        return self.type != "none"


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.99996
    evaluate: bool = True  # validate/test with the EMA weights when enabled

    def validate(self) -> None:
        _require(0 < self.decay < 1, "ema.decay", self.decay, "in (0, 1)")


@dataclass
class TrainConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    # torch.compile the model: true (inductor, torch's default) or a Dynamo backend's name
    compile: bool | str = False

    @property
    def compile_backend(self) -> str | None:
        """The backend ``torch.compile`` is given; None where the model is not compiled."""
        if self.compile is False:
            return None
        return "inductor" if self.compile is True else str(self.compile)


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: must be {allowed}")


def container(cfg: DictConfig, *, resolve: bool = True) -> dict[str, Any]:
    """``OmegaConf.to_container(cfg)``: the dict a DictConfig gives (OmegaConf's stub types
    the result as any container, of any config, so each caller would have to narrow it)."""
    return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=resolve))


T = TypeVar("T", bound="DataclassInstance")


def to_dataclass(cls: type[T], data: DictConfig | dict | None, prefix: str) -> T:
    """Builds ``cls`` from config data, naming the first unknown or mistyped key."""
    if isinstance(data, DictConfig):
        data = container(data)
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}.{key} is not a known key; allowed: "
                              f"{', '.join(sorted(known))}")
    values = {}
    for key, value in data.items():
        values[key] = _coerce(value, hints[key], f"{prefix}.{key}")
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate:
        validate()
    return obj


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}={value!r} has the wrong type")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r} must be a list of {len(args)} numbers")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return to_dataclass(hint, value, key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r} must be a number")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an integer")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    return value


def train_config(cfg: DictConfig) -> TrainConfig:
    return TrainConfig(
        optim=to_dataclass(OptimConfig, cfg.get("optim"), "optim"),
        sched=to_dataclass(SchedConfig, cfg.get("sched"), "sched"),
        recipe=to_dataclass(RecipeConfig, cfg.get("recipe"), "recipe"),
        ema=to_dataclass(EmaConfig, cfg.get("ema"), "ema"),
        distillation=to_dataclass(DistillationConfig, cfg.get("distillation"), "distillation"),
        compile=_coerce(cfg.get("compile", False), bool | str, "compile"),
    )


def fit_warmup(sched: SchedConfig, max_epochs: int) -> str | None:
    """Caps a warm-up that would take more than half the run at half the run; returns the
    line that says so, or None. Without it a short run (``trainer.max_epochs=3`` with the
    5-epoch DeiT warm-up) never reaches its lr and ends at chance."""
    limit = max_epochs / 2
    if sched.name == "constant" or sched.warmup_epochs <= limit:
        return None
    message = (f"sched.warmup_epochs={sched.warmup_epochs:g} is more than half of "
               f"trainer.max_epochs={max_epochs}: warming up for {limit:g} epochs instead")
    sched.warmup_epochs = limit
    return message


def _cait(model_name: str | None) -> bool:
    """Whether a model is of the CaiT family, by its name (cait_s24_224, cait_tiny)."""
    return str(model_name or "").startswith("cait")


def eval_crop_pct(model_name: str | None) -> float:
    """The center crop a model is evaluated at, as timm's configs for its name say: 1.0 for
    CaiT (``timm/models/cait.py``: ``crop_pct=1.0``, as the CaiT README evaluates), 0.875
    for DeiT, ViT and any other model (DeiT's ``main.py``: resize to size / 0.875)."""
    return 1.0 if _cait(model_name) else 0.875


def paper_epochs(model_name: str | None) -> int:
    """How long the papers trained a model on ImageNet: 400 epochs for CaiT (Touvron et al.
    2021, "Going deeper with image transformers", and its README_cait.md), 300 for DeiT
    (Touvron et al. 2021, "Training data-efficient image transformers", Table 9) and the
    rest."""
    return 400 if _cait(model_name) else 300


def lr_floor(sched: SchedConfig, peak: float) -> tuple[float, str | None]:
    """The lr the cosine ends at: ``sched.min_lr``, unscaled (DeiT scales the peak lr with the
    batch, not its floor), capped at the ``peak`` lr; a floor above the peak would make the
    cosine climb. Returns the floor and the line that says it was capped, or None."""
    if sched.min_lr <= peak:
        return sched.min_lr, None
    return peak, (f"sched.min_lr={sched.min_lr:g} is above the peak lr {peak:g}: the cosine "
                  "ends at the peak instead (the lr stays flat after the warm-up)")


def check_choice(group: str, choice: str | None, options: list[str], given: bool) -> None:
    """An option of an ``optional`` group that does not exist is silently skipped by Hydra:
    refused here when the user named it (``recipe=digitz``)."""
    if not given or choice is None or choice in options:
        return
    close = difflib.get_close_matches(str(choice), options, n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; options: {', '.join(options)}"
    raise ConfigError(f"{group}={choice} is not an option of {group}{hint}")


def check_recipe_choice(overrides: list[str]) -> None:
    """``recipe`` is optional (data without a recipe of its own keeps the group defaults), so
    Hydra would skip a mistyped ``recipe=...`` without a word."""
    try:
        choice = HydraConfig.get().runtime.choices.get("recipe")
    except ValueError:
        return
    if not GlobalHydra.instance().is_initialized():  # a job unpickled by submitit
        return
    given = any(o.lstrip("+~").split("=")[0] == "recipe" for o in overrides)
    options = GlobalHydra.instance().config_loader().get_group_options("recipe")
    check_choice("recipe", choice, options, given)


def gpus_bound_per_task(trainer: dict[str, Any], under_slurm: bool, gpus_visible: int) -> bool:
    """Whether this SLURM task sees just its own GPU of the ``trainer.devices`` its node runs
    (``--gpus-per-task``, ``--gpu-bind`` or a site's default): each rank then trains on its
    task's only GPU, where without binding rank k of a node takes the node's GPU k."""
    devices = trainer.get("devices", 1)
    return (under_slurm and str(trainer.get("accelerator")) in ("gpu", "cuda")
            and isinstance(devices, int) and devices > 1 and gpus_visible == 1)


def check_trainer(trainer: DictConfig | dict, *, multirun: bool, under_slurm: bool,
                  gpus_visible: int, cpus: int) -> None:
    """What Lightning would accept but cannot work, caught before anything is trained."""
    t = container(trainer) if isinstance(trainer, DictConfig) else dict(trainer)
    epochs = t.get("max_epochs")
    _require(isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1,
             "trainer.max_epochs", epochs, "an integer >= 1")
    nodes = t.get("num_nodes", 1)
    _require(isinstance(nodes, int) and nodes >= 1, "trainer.num_nodes", nodes,
             "an integer >= 1")
    devices = t.get("devices", 1)
    if devices == "auto":
        return
    _require(isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1,
             "trainer.devices", devices, "an integer >= 1 or auto")
    accelerator = str(t.get("accelerator", "cpu"))
    if accelerator in ("gpu", "cuda") and not gpus_bound_per_task(t, under_slurm, gpus_visible):
        _require(devices <= gpus_visible, "trainer.devices", devices,
                 f"at most the {gpus_visible} GPU(s) visible here")
    elif accelerator == "cpu":
        _require(devices <= cpus, "trainer.devices", devices,
                 f"at most the {cpus} CPU core(s) here")
    if devices > 1 and multirun and not under_slurm:
        raise ConfigError(
            f"trainer.devices={devices} in a local sweep: Lightning would re-launch the whole "
            "sweep once per device; submit it with hydra/launcher=slurm (one task per device) "
            "or run one config at a time without -m")


def project_on_path() -> None:
    """Makes a project's own classes (``model._target_=mynet.MyNet``) in the folder a console
    script runs in importable, as ``python -m`` would; appended, so that a folder there never
    shadows an installed package."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)
