"""The training task: one config in, one run folder trained (or resumed, or skipped) out.

``train`` is the story of a run; the folder and its states are ``caitlab.training.lifecycle``'s,
what is built for it (data, model, trainer) is below. Heavy imports (torch, lightning) happen
only once there is work to do: ``--cfg job`` and skipped runs stay fast.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from caitlab import slots, stages
from caitlab.config import (
    CONF_DIR,
    ConfigError,
    check_recipe_choice,
    check_trainer,
    fit_warmup,
    gpus_bound_per_task,
    shadowed_options,
    train_config,
)
from caitlab.console import one_handler_per_line, quiet_known_warnings, say
from caitlab.cpus import set_torch_threads
from caitlab.errors import UserError, constructor_refusal
from caitlab.identity import run_delta, variant_of
from caitlab.models.axes import ablation_axes
from caitlab.secrets import redact
from caitlab.training.lifecycle import Run, is_multirun, job_overrides, shown_path
from caitlab.training.ranks import process_rank
from caitlab.training.reuse import check_reuse, data_fingerprint

log = logging.getLogger("caitlab")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Trains (or resumes, or skips) the run described by ``cfg``; returns its summary."""
    _refuse_shadowed_options()
    run = Run.of(cfg)
    check_reuse(run.dir, run.previous, cfg)  # the folder holds this config's run, or none
    previous = run.done(retry_failed=bool(cfg.get("retry_failed", False)))
    if previous is not None:
        return previous
    upstreams = run.upstreams(cfg)  # a stage's upstream checkpoints, or it is blocked
    quiet_known_warnings()
    one_handler_per_line()
    parts = build(cfg, run, upstreams)
    resolved = run.open(cfg)
    run.start(parts.facts(cfg, run, resolved))
    with run.attempt():
        run.loggers = _loggers(cfg, run, resolved)
        module = parts.module(cfg)
        trainer, best = build_trainer(cfg, run)
        run.uses(trainer)
        trainer.fit(module, datamodule=parts.datamodule,
                    ckpt_path=str(run.resume_from) if run.resume_from else None)
        if trainer.interrupted:
            raise KeyboardInterrupt
        # the number verdicts compare is never measured on the images that chose its
        # checkpoint: where those are the test images, the last checkpoint is scored
        selection = data_selection(parts.datamodule)
        run.summary.update(selection=selection)
        # the path itself: ckpt_path="best" would read the first ModelCheckpoint (latest)
        results = trainer.test(module, datamodule=parts.datamodule,
                               ckpt_path=best.to_score(selection["scored"]), verbose=False)
        return run.complete({k: float(v) for k, v in (results[0] if results else {}).items()})


def data_selection(datamodule: Any) -> dict[str, Any]:
    """The summary's ``selection`` (``caitlab.data.base.selection_facts``): which split chose
    the checkpoint, which one is scored, and whether the test measured it on the images that
    chose it.

    Args:
        datamodule: the run's data module; a project's own one that does not say
            (no ``selection()``) keeps the best checkpoint, ``test_is_selection`` unknown (None).
    """
    own = getattr(datamodule, "selection", None)
    if callable(own):
        return own()
    return {"split": "val", "scored": "best", "test_is_selection": None}


def _data_fingerprint(cfg: DictConfig, run: Run) -> str | None:
    root = cfg.data.get("root")
    return data_fingerprint(root) if run.rank_zero and isinstance(root, str) else None


def _refuse_shadowed_options() -> None:
    """A project's option named like one of caitlab's (``./conf/model/cait_tiny.yaml``) is
    refused: Hydra would train caitlab's under the name the user gave their own."""
    if not HydraConfig.initialized():
        return
    found = shadowed_options(HydraConfig.get().runtime.config_sources)
    if found:
        yours, ours = found[0]
        group = ours.parent.relative_to(CONF_DIR).as_posix()
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise UserError(f"{shown_path(yours)}{more} has the name of caitlab's {group}/"
                        f"{ours.name} ({ours}), which Hydra would use instead: rename yours "
                        f"({group}=my_{ours.stem})")


@dataclass
class Parts:
    """What a run trains: its data and model, built and checked before its folder exists."""

    datamodule: Any
    model: Any
    model_name: str
    macs: int | None
    threads: int
    recipe: Any  # caitlab.config.TrainConfig, its warm-up fitted to the run's length
    slot: dict[str, Any] | None = None  # a local sweep's share of the machine (caitlab.slots)
    teacher: Any = None  # the frozen teacher of a distilled run (training.distillation)

    def facts(self, cfg: DictConfig, run: Run, resolved: dict[str, Any]) -> dict[str, Any]:
        """The summary's description of the run: identity, model, axes."""
        from caitlab.models import count_params  # torch: kept off --cfg job

        own = getattr(self.model, "config", None)  # a caitlab model's: "auto" values resolved
        axes = ablation_axes({**(resolved.get("model") or {}),
                              **(own if isinstance(own, dict) else {})}, self.model_name)
        delta = run_delta(cfg)
        return {
            # the folder's name: the signature, or the previous rule's for a folder it wrote
            "signature": run.dir.name,
            # outside a Hydra app (train() called with a config of one's own) there is no
            # delta to tell the seed from the rest: the run is a variant of its own
            "variant": variant_of(delta) if delta is not None else run.dir.name,
            "delta": redact(delta),  # what makes the run differ from the defaults
            "name": cfg.name,
            "overrides": redact(job_overrides()),
            # the data's config choice (``digits``): what the report's verdicts name
            "data": (HydraConfig.get().runtime.choices.get("data")
                     if HydraConfig.initialized() else None),
            "axes": axes,
            "model": {"name": self.model_name, "target": cfg.model.get("_target_"),
                      "params": count_params(self.model), "macs": self.macs,
                      "config": own},
            "seed": cfg.seed,
            # what lies where the data was read: the data, wherever it is later (reuse.py)
            "data_fingerprint": _data_fingerprint(cfg, run),
            **_stage_facts(cfg),
            **({"teacher": self._teacher_facts()} if self.teacher is not None else {}),
            "threads": self.threads,
            **({"slot": self.slot} if self.slot else {}),
        }

    def _teacher_facts(self) -> dict[str, Any]:
        from caitlab.models import count_params  # torch: kept off --cfg job
        from caitlab.training.distillation import teacher_name  # torch: kept off --cfg job

        d = self.recipe.distillation
        return {"source": str(d.teacher), "name": teacher_name(str(d.teacher)),
                "type": d.type, "alpha": d.alpha, "tau": d.tau,
                "params": count_params(self.teacher)}

    def module(self, cfg: DictConfig) -> Any:
        import torch  # heavy: kept off --cfg job

        from caitlab.training.module import ClassificationModule  # Lightning: kept off --cfg job

        module = ClassificationModule(self.model, num_classes=cfg.data.num_classes,
                                      cfg=self.recipe, batch_size=cfg.data.batch_size,
                                      teacher=self.teacher)
        if self.recipe.compile_backend:
            # torch types compile's result as the callable given; of a module it is a module
            module.model = cast(torch.nn.Module, torch.compile(
                module.model, backend=self.recipe.compile_backend))
        return module


def _stage_facts(cfg: DictConfig) -> dict[str, Any]:
    """A chain's stage: its name, and the upstream run each reference names."""
    if not cfg.get("stage"):
        return {}
    ups = {key: {"stage": found[0], "signature": found[1]} for key in stages.REFERENCE_KEYS
           if (found := stages.parse(OmegaConf.select(cfg, key))) is not None}
    return {**stages.stage_facts(cfg.stage, cfg.get("stages") or {}),
            **({"upstream": ups} if ups else {})}


def build(cfg: DictConfig, run: Run, upstreams: dict[str, str] | None = None) -> Parts:
    """Checks the config and builds the data and the model; a mistake in either is one line
    (``UserError``), recorded in a sweep's summary, before anything is written. ``upstreams``:
    the checkpoints a stage's references name, by key (``Run.upstreams``)."""
    import lightning as L  # heavy: kept off --cfg job
    import torch  # heavy: kept off --cfg job
    from lightning.pytorch.plugins.environments import SLURMEnvironment  # heavy: kept off --cfg job

    from caitlab.data import DataConfigError  # Lightning: kept off --cfg job
    from caitlab.models import (  # torch: kept off --cfg job
        CheckpointError,
        ModelConfigError,
        UnknownModelError,
        load_checkpoint,
    )

    user_errors = (ConfigError, ModelConfigError, UnknownModelError, DataConfigError,
                   CheckpointError)
    upstreams = upstreams or {}
    try:
        tcfg = train_config(cfg)
        if "distillation.teacher" in upstreams:
            tcfg.distillation.teacher = upstreams["distillation.teacher"]
        check_recipe_choice(job_overrides())
        slot = slots.claim(cfg, run.dir)  # before CUDA starts: it sets the GPUs visible
        check_trainer(cfg.trainer, multirun=is_multirun(), under_slurm=SLURMEnvironment.detect(),
                      gpus_visible=torch.cuda.device_count(), cpus=os.cpu_count() or 1)
        threads = set_torch_threads(cfg)
        warmup_note = fit_warmup(tcfg.sched, cfg.trainer.max_epochs)
        if warmup_note:
            say(log, warmup_note)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
        rank = process_rank(cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1)
        if rank:
            # the same initial weights on every rank (above), then each its own draws, as
            # DeiT seeds with seed + rank: drop-path masks, Mixup/CutMix and random erasing
            # differ across ranks (Lightning re-seeds DDP ranks with the seed set last)
            L.seed_everything(cfg.seed + rank, workers=True, verbose=False)
        name = cfg.model.get("name", type(model).__name__)
        # before the run folder exists: a model that cannot take the data's images stops here
        macs = model_macs(model, datamodule, cfg.data, name)
        finetune_from = upstreams.get("finetune_from", cfg.get("finetune_from"))
        if finetune_from:
            load_checkpoint(model, finetune_from)  # all or nothing, names the bad keys
        teacher = _teacher(tcfg, model, datamodule, cfg.data)
    except Exception as err:
        # Hydra's instantiate wraps constructor errors; the user's mistake is the cause.
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, user_errors):
            cause = cause.__cause__
        message = str(cause) if cause is not None else constructor_refusal(err)
        if message is None:
            raise
        raise run.refuse(message) from None
    return Parts(datamodule, model, name, macs, threads, tcfg, slot, teacher)


def _teacher(tcfg: Any, model: Any, datamodule: Any, data_cfg: Any) -> Any:
    """A distilled run's teacher, checked against the data's images and classes."""
    if not tcfg.distillation.active:
        return None
    from caitlab.training.distillation import load_teacher  # heavy: kept off --cfg job

    chans, size = _data_input(datamodule, data_cfg)
    size = size or (getattr(model, "config", None) or {}).get("img_size")
    return load_teacher(tcfg.distillation, chans or data_cfg.in_chans, data_cfg.num_classes,
                        size)


def _data_input(datamodule: Any, data_cfg: Any) -> tuple[Any, Any]:
    """(channels, image size) of the data's images, as the datamodule or its config says."""
    return (getattr(datamodule, "in_chans", None) or data_cfg.get("in_chans"),
            getattr(datamodule, "img_size", None) or data_cfg.get("img_size"))


def model_macs(model: Any, datamodule: Any, data_cfg: Any, model_name: str) -> int | None:
    """MACs per image. A caitlab model knows its input; a project's own model is counted on
    one image of the data (None when the data does not say its image size)."""
    from caitlab.models import count_macs  # torch: kept off --cfg job

    if isinstance(getattr(model, "config", None), dict):
        return count_macs(model)
    chans, size = _data_input(datamodule, data_cfg)
    if not isinstance(chans, int) or not isinstance(size, int):
        return None
    try:
        return count_macs(model, size, chans)
    except Exception as err:  # the model cannot take the data's images: say so before training
        raise ConfigError(f"model: {model_name} cannot take one {chans}x{size}x{size} image of "
                          f"the data (data.in_chans, data.img_size): {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}") from None


def _loggers(cfg: DictConfig, run: Run, resolved: dict[str, Any]) -> list:
    """The configured loggers; wandb's run id is kept in the summary, so that a resumed run
    continues the same wandb run."""
    from caitlab.training.tracking import build_loggers  # Lightning: kept off --cfg job

    wandb_id = run.summary.get("wandb_run_id")
    if wandb_id is None and any("Wandb" in str(v.get("_target_", ""))
                                for v in (cfg.get("logger") or {}).values() if v):
        wandb_id = uuid.uuid4().hex[:8]  # wandb's own id format: 8 lowercase alphanumerics
        run.summary.update(wandb_run_id=wandb_id)
    axes = run.summary.get("axes") or {}
    shown = [o for o in run.summary.get("overrides") or []
             if not o.startswith(("model=", "experiment=", "hydra", "logger"))]
    return build_loggers(cfg.get("logger"), run.dir,
                         name=" ".join([run.summary["model"]["name"], *shown]), group=cfg.name,
                         tags=[f"{k}={v}" for k, v in axes.items() if v is not None][:64],
                         config={**resolved, "provenance": run.summary.get("provenance")},
                         wandb_id=wandb_id)


def build_trainer(cfg: DictConfig, run: Run) -> tuple[Any, Any]:
    """Lightning's trainer with caitlab's callbacks (checkpoints, the summary, preemption,
    the console) and the configured ones; returns it and the best-checkpoint callback."""
    import torch  # heavy: kept off --cfg job
    from lightning.pytorch.callbacks import ModelCheckpoint  # heavy: kept off --cfg job
    from lightning.pytorch.plugins.environments import SLURMEnvironment  # heavy: kept off --cfg job

    from caitlab.training.callbacks import (  # Lightning: kept off --cfg job
        BestCheckpoint,
        EpochLines,
        SteadyProgressBar,
        SummaryCallback,
    )
    from caitlab.training.preemption import (  # Lightning: kept off --cfg job
        BackgroundCheckpointIO,
        GracefulStop,
        ReleaseWrites,
    )

    ckpts = run.dir / "checkpoints"
    # Lightning's save_last only follows a new best; resuming needs every epoch's state.
    latest = ModelCheckpoint(dirpath=ckpts, filename="last", monitor=None, save_top_k=1,
                             enable_version_counter=False)
    best = BestCheckpoint(dirpath=ckpts, filename="best", monitor="val/top1", mode="max",
                          save_top_k=1, enable_version_counter=False, latest=latest)
    run.stopper = GracefulStop(ckpts / "last.ckpt")
    # latest before best: best.ckpt links to the last.ckpt of the same epoch
    callbacks = [latest, best, SummaryCallback(run.summary, run.clock), run.stopper,
                 ReleaseWrites()]
    callbacks += [instantiate(c) for c in (cfg.get("callbacks") or {}).values()
                  if c is not None and "_target_" in c]
    # A bar is for a terminal: in a file (a pipe, a SLURM log) every redraw is lines of its
    # own, so there the epoch lines stand in for it.
    bar = bool(cfg.trainer.get("enable_progress_bar", True)) and sys.stdout.isatty()
    callbacks.append(EpochLines(console=not bar))
    if bar:
        callbacks.append(SteadyProgressBar(leave=True))
    bound = gpus_bound_per_task(cfg.trainer, SLURMEnvironment.detect(), torch.cuda.device_count())
    strategy = _ddp_strategy(cfg.trainer.get("strategy"), cfg.get("dist_timeout_s"),
                             [torch.device("cuda", 0)] * cfg.trainer.devices if bound else None)
    plugins: list = [BackgroundCheckpointIO()]
    if SLURMEnvironment.detect():
        # ranks from SLURM (one task per device); requeue is submitit's job, not Lightning's
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = instantiate(cfg.trainer, logger=run.loggers, callbacks=callbacks,
                          enable_progress_bar=bar, plugins=plugins,
                          default_root_dir=str(run.dir),
                          **({"strategy": strategy} if strategy is not None else {}),
                          # a task bound to its GPU: the node's ranks are the strategy's
                          **({"devices": 1} if bound else {}))
    return trainer, best


def _ddp_strategy(strategy: Any, timeout_s: Any, parallel_devices: list | None = None) -> Any:
    """Lightning's DDP strategy named by ``trainer.strategy``, its process group's timeout
    ``dist_timeout_s`` (Lightning's is 30 minutes: a hung rank would hold every GPU of the
    job that long); None for any other strategy, which Lightning builds as named.

    ``parallel_devices``: each of the node's ranks' device, where SLURM binds each task to its
    own GPU (every rank's is then ``cuda:0``, the one its task sees), for the trainer to run
    with ``devices=1``: Lightning would look for GPU k of the task for rank k."""
    if parallel_devices is not None and strategy in (None, "auto"):
        strategy = "ddp"  # what Lightning picks for several devices
    if strategy not in ("ddp", "ddp_find_unused_parameters_true") or not (
            timeout_s or parallel_devices):
        return None
    from lightning.pytorch.strategies import DDPStrategy  # heavy: kept off --cfg job

    timeout: dict[str, Any] = {"timeout": timedelta(seconds=float(timeout_s))} if timeout_s else {}
    return DDPStrategy(find_unused_parameters=strategy.endswith("_true"),
                       parallel_devices=parallel_devices, **timeout)
