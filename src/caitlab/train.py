"""``caitlab-train``: the Hydra app that trains one configuration into its run folder.

The run folder is named by the config's signature (``runs.py``): launching a config that
already completed skips it, one that stopped part-way resumes from ``last.ckpt``.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import sys
import time
import traceback
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from caitlab.console import one_handler_per_line, say
from caitlab.identity import run_delta, variant_of
from caitlab.provenance import commit_of, provenance
from caitlab.runs import (
    DISK_FULL_ERRNOS,
    ResumeError,
    RunFailed,
    RunLock,
    Summary,
    read_summary,
    register_resolvers,
    remove_stale_temp_files,
    resume_checkpoint,
    signature,
    skip_reason,
    storage_error,
    variant_signature,
    write_text_atomic,
)
from caitlab.secrets import hide_in_argv, redact

register_resolvers()
# train.yaml's searchpath names ./conf, which most folders do not have: not worth a warning.
warnings.filterwarnings("ignore", message="provider=hydra.searchpath in main, path=.* is not")

# The package's own configs (shipped in the wheel); a project adds its own through ./conf
# (hydra.searchpath in train.yaml), --config-dir or hydra.searchpath=[...].
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def project_on_path() -> None:
    """Makes a project's own classes (``model._target_=mynet.MyNet``) in the folder a console
    script runs in importable, as ``python -m`` would; appended, so that a folder there never
    shadows an installed package."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, without a traceback."""


log = logging.getLogger("caitlab")
# the lines of this process's sweep jobs that failed or were skipped as failed
_failed_runs: list[str] = []


def storage_message(err: OSError, where: Path | None = None) -> str:
    """One line for a write the storage refused, naming the file (or the folder written in)."""
    path = err.filename or where
    if err.errno in DISK_FULL_ERRNOS:
        return (f"no space left on device writing {path}; files written before are intact: "
                "free space, then run the same command again")
    return f"cannot write {path}: {err.strerror}"


def _overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def slurm_job_id() -> str | None:
    """This job's id as squeue shows it (``1234_5`` for a task of an array)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def is_rank_zero() -> bool:
    """Only global rank 0 writes the run folder (under SLURM every task runs this app)."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var) not in (None, "0") and (
            var != "SLURM_PROCID" or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        ):
            return False
    return True


def _check_recipe_choice() -> None:
    """``recipe`` is optional (data without a recipe of its own keeps the group defaults), so
    Hydra would skip a mistyped ``recipe=...`` without a word."""
    from hydra.core.global_hydra import GlobalHydra

    from caitlab.config import check_choice

    try:
        choice = HydraConfig.get().runtime.choices.get("recipe")
    except ValueError:
        return
    if not GlobalHydra.instance().is_initialized():  # a job unpickled by submitit
        return
    given = any(o.lstrip("+~").split("=")[0] == "recipe" for o in _overrides())
    options = GlobalHydra.instance().config_loader().get_group_options("recipe")
    check_choice("recipe", choice, options, given)


def _set_threads(cfg: DictConfig) -> int:
    """torch's intra-op threads from the CPUs this run was given (``caitlab.cpus``), shared
    by the DDP ranks of one machine outside SLURM; returns the count."""
    import torch

    from caitlab.cpus import available_cpus, torch_threads

    devices = cfg.trainer.get("devices", 1)
    local_ranks = devices if (isinstance(devices, int) and cfg.trainer.get("accelerator")
                              == "cpu" and not os.environ.get("SLURM_CPUS_PER_TASK")) else 1
    threads = torch_threads(cfg.get("threads", "auto"), available_cpus(), local_ranks)
    torch.set_num_threads(threads)
    return threads


def _run_dir(cfg: DictConfig) -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called outside Hydra (tests): the configured folder
        return Path(cfg.paths.run_dir)


def constructor_refusal(err: BaseException) -> str | None:
    """One line for a class that refused the arguments its config gave it (a TypeError or
    ValueError from its constructor, which Hydra's instantiate wraps, as from a project's own
    model): the config key, the class, the reason, and for a mistyped argument the closest
    one it takes. None for any other error."""
    import inspect

    from hydra.errors import InstantiationException
    from hydra.utils import get_object

    cause = err.__cause__
    if not isinstance(err, InstantiationException) or not isinstance(cause,
                                                                     (TypeError, ValueError)):
        return None
    text = str(err)
    key = (re.search(r"full_key: (\S+)", text) or [None, "model"])[1]
    target = (re.search(r"target '([^']+)'", text) or [None, "?"])[1]
    reason = re.sub(r"^[\w.]*__init__\(\) ", "", str(cause).splitlines()[0] if str(cause)
                    else type(cause).__name__)
    mistyped = re.search(r"unexpected keyword argument '(\w+)'", reason)
    if mistyped:
        try:
            takes = list(inspect.signature(get_object(target)).parameters)
        except Exception:  # nothing to suggest from
            takes = []
        close = difflib.get_close_matches(mistyped[1], takes, n=1, cutoff=0.5)
        if close:
            reason += f" (did you mean {key}.{close[0]}?)"
    return f"{key}: {target}: {reason}"


def _model_macs(model: Any, datamodule: Any, data_cfg: Any, model_name: str) -> int | None:
    """MACs per image. A caitlab model knows its input; a project's own model is counted on
    one image of the data (None when the data does not say its image size)."""
    from caitlab.config import ConfigError
    from caitlab.models import count_macs

    if isinstance(getattr(model, "config", None), dict):
        return count_macs(model)
    chans = getattr(datamodule, "in_chans", None) or data_cfg.get("in_chans")
    size = getattr(datamodule, "img_size", None) or data_cfg.get("img_size")
    if not isinstance(chans, int) or not isinstance(size, int):
        return None
    try:
        return count_macs(model, size, chans)
    except Exception as err:  # the model cannot take the data's images: say so before training
        raise ConfigError(f"model: {model_name} cannot take one {chans}x{size}x{size} image of "
                        f"the data (data.in_chans, data.img_size): {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from None


def _run_name(model_name: str, overrides: list[str]) -> str:
    shown = [o for o in overrides if not o.startswith(("model=", "experiment=", "hydra", "logger"))]
    return " ".join([model_name, *shown])


def _tags(axes: dict[str, Any]) -> list[str]:
    return [f"{k}={v}" for k, v in axes.items() if v is not None][:64]


def _quiet_known_warnings() -> None:
    # Lightning's hints that do not apply: runs outside SLURM on a machine that has srun, and
    # a run folder that already holds our own files.
    for message in (".*`srun` command is available.*", ".*exists and is not empty.*",
                    ".*LeafSpec.*is deprecated.*", ".*does not have many workers.*"):
        warnings.filterwarnings("ignore", message=message)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Trains (or resumes, or skips) the run described by ``cfg``; returns its summary."""
    run_dir = _run_dir(cfg)
    previous = read_summary(run_dir)
    reason = skip_reason(previous, bool(cfg.get("retry_failed", False)))
    if reason == "completed":
        say(log, f"already completed, skipping: {result_line(previous, run_dir)}")
        return previous
    if reason is not None:
        raise RunFailed(skipped_message(previous, run_dir))

    # Heavy imports only once we know there is work to do (--cfg job, skips stay fast).
    import lightning as L
    import torch
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from caitlab.config import ConfigError, check_trainer, fit_warmup, train_config
    from caitlab.data import DataConfigError, ImageReadError, data_error_message
    from caitlab.models import (
        CheckpointError,
        ModelConfigError,
        UnknownModelError,
        count_params,
        load_checkpoint,
    )
    from caitlab.models.axes import ablation_axes
    from caitlab.training.callbacks import (
        BestCheckpoint,
        EpochLines,
        SteadyProgressBar,
        SummaryCallback,
    )
    from caitlab.training.module import ClassificationModule, DivergedError
    from caitlab.training.preemption import AtomicCheckpointIO, GracefulStop
    from caitlab.training.tracking import build_loggers, finish_wandb, wandb_run

    _quiet_known_warnings()
    one_handler_per_line()
    user_errors = (ConfigError, ModelConfigError, UnknownModelError, DataConfigError,
                   CheckpointError)
    try:
        tcfg = train_config(cfg)
        _check_recipe_choice()
        check_trainer(cfg.trainer, multirun=_is_multirun(),
                      under_slurm=SLURMEnvironment.detect(),
                      gpus_visible=torch.cuda.device_count(), cpus=os.cpu_count() or 1)
        threads = _set_threads(cfg)
        warmup_note = fit_warmup(tcfg.sched, cfg.trainer.max_epochs)
        if warmup_note:
            say(log, warmup_note)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = instantiate(cfg.data)
        model = instantiate(cfg.model)
        # before the run folder exists: a model that cannot take the data's images leaves none
        macs = _model_macs(model, datamodule, cfg.data,
                           cfg.model.get("name", type(model).__name__))
        if cfg.get("finetune_from"):
            load_checkpoint(model, cfg.finetune_from)  # all or nothing, names the bad keys
    except Exception as err:
        # Hydra's instantiate wraps constructor errors; the user's mistake is the cause.
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, user_errors):
            cause = cause.__cause__
        message = str(cause) if cause is not None else constructor_refusal(err)
        if message is not None:
            if _is_multirun():  # the sweep's table must show this run, and why it failed
                Summary(run_dir, {"overrides": redact(_overrides()), "name": cfg.name,
                                  "signature": run_dir.name}).update(
                    status="failed", error=redact(message))
            raise UserError(message) from None
        raise

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"paths.output_dir: cannot write the run folder {run_dir}: "
                        f"{err.strerror or err}") from None
    lock = RunLock(run_dir) if is_rank_zero() else None
    if lock is not None and not lock.acquire():
        raise UserError(f"{run_dir} is being trained by another process ({lock.holder()}); "
                        "not starting it twice")
    if lock is not None:  # held: whatever temporary file is here, its writer is dead
        remove_stale_temp_files(run_dir)
    resolved = redact(OmegaConf.to_container(cfg, resolve=True))
    rank_zero = is_rank_zero()
    if rank_zero:
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
    overrides = redact(_overrides())
    if rank_zero:
        write_text_atomic(run_dir / "overrides.yaml",
                          OmegaConf.to_yaml(OmegaConf.create(overrides)))

    model_name = cfg.model.get("name", type(model).__name__)
    own_config = getattr(model, "config", None)  # a caitlab model's: "auto" values resolved
    axes = ablation_axes({**(resolved.get("model") or {}),
                          **(own_config if isinstance(own_config, dict) else {})}, model_name)
    params = count_params(model)
    last_ckpt = run_dir / "checkpoints" / "last.ckpt"
    try:
        resume_from = resume_checkpoint(run_dir / "checkpoints")
    except ResumeError as err:
        raise UserError(str(err)) from None
    delta = run_delta(cfg)
    summary = Summary(run_dir, writable=rank_zero, initial={
        # the folder's name: the signature, or the previous rule's for a folder written by it
        "signature": run_dir.name if HydraConfig.initialized() else signature(cfg),
        "variant": variant_of(delta) if delta is not None else variant_signature(cfg),
        "delta": redact(delta),  # what makes the run differ from the defaults
        "name": cfg.name,
        "overrides": overrides,
        "axes": axes,
        "model": {"name": model_name, "target": cfg.model.get("_target_"), "params": params,
                  "macs": macs, "config": getattr(model, "config", None)},
        "seed": cfg.seed,
    })
    attempt_t0 = time.time()
    wall_before = summary.get("wall_s", 0.0) or 0.0
    code, diff = provenance()
    before = commit_of(summary.data)
    if resume_from and before and before != commit_of({"provenance": code}):
        say(log, f"resuming {shown_path(run_dir)}, started by code {before}, with code "
                 f"{commit_of({'provenance': code})}: its weights may not match an "
                 "uninterrupted run's")
    if rank_zero and diff:  # the uncommitted changes the run's numbers depend on
        write_text_atomic(run_dir / "code.diff", redact(diff))
    summary.update(status="running", attempts=summary["attempts"] + 1,
                   resumed_from=str(resume_from) if resume_from else None,
                   slurm_job_id=slurm_job_id(), provenance=code, threads=threads,
                   # the local launcher's job (its logs: caitlab-sweep log)
                   submitit_job_id=os.environ.get("SUBMITIT_LOCAL_JOB_ID"))
    if resume_from:  # Lightning's own line about it is in train.log only (caitlab.console)
        say(log, f"resuming {shown_path(run_dir)} from {resume_from.name} "
                 f"(attempt {summary['attempts']})")

    exit_code = 1
    loggers: list = []
    stopper = None
    try:
        wandb_id = summary.get("wandb_run_id")
        if wandb_id is None and any("Wandb" in str(v.get("_target_", ""))
                                    for v in (cfg.get("logger") or {}).values() if v):
            wandb_id = uuid.uuid4().hex[:8]  # wandb's own id format: 8 lowercase alphanumerics
            summary.update(wandb_run_id=wandb_id)
        loggers = build_loggers(cfg.get("logger"), run_dir,
                                name=_run_name(model_name, overrides), group=cfg.name,
                                tags=_tags(axes), config={**resolved, "provenance": code},
                                wandb_id=wandb_id)

        module = ClassificationModule(model, num_classes=cfg.data.num_classes, cfg=tcfg,
                                      batch_size=cfg.data.batch_size)
        if tcfg.compile:
            module.model = torch.compile(module.model)
        # Lightning's save_last only follows a new best; resuming needs every epoch's state.
        latest = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last",
                                 monitor=None, save_top_k=1, enable_version_counter=False)
        checkpointing = BestCheckpoint(dirpath=run_dir / "checkpoints", filename="best",
                                       monitor="val/top1", mode="max", save_top_k=1,
                                       enable_version_counter=False, latest=latest)
        stopper = GracefulStop(last_ckpt)
        # latest before best: best.ckpt links to the last.ckpt of the same epoch
        callbacks = [latest, checkpointing, SummaryCallback(summary, wall_before, attempt_t0),
                     stopper]
        for cb_cfg in (cfg.get("callbacks") or {}).values():
            if cb_cfg is not None and "_target_" in cb_cfg:
                callbacks.append(instantiate(cb_cfg))
        # A bar is for a terminal: in a file (a pipe, a SLURM log) every redraw is lines of
        # its own, so there the epoch lines stand in for it.
        bar = bool(cfg.trainer.get("enable_progress_bar", True)) and sys.stdout.isatty()
        callbacks.append(EpochLines(console=not bar))
        if bar:
            callbacks.append(SteadyProgressBar(leave=True))
        plugins: list = [AtomicCheckpointIO()]
        if SLURMEnvironment.detect():
            # ranks from SLURM (one task per device); requeue is submitit's job, not Lightning's
            plugins.append(SLURMEnvironment(auto_requeue=False))
        trainer = instantiate(cfg.trainer, logger=loggers, callbacks=callbacks,
                              enable_progress_bar=bar,
                              plugins=plugins, default_root_dir=str(run_dir))

        summary.update(world_size=trainer.world_size)
        trainer.fit(module, datamodule=datamodule,
                    ckpt_path=str(resume_from) if resume_from else None)
        if trainer.interrupted:
            summary.update(status="interrupted")
            raise KeyboardInterrupt
        # the path itself: ckpt_path="best" would read the first ModelCheckpoint (latest)
        test_ckpt = checkpointing.best_model_path or None
        results = trainer.test(module, datamodule=datamodule, ckpt_path=test_ckpt,
                               verbose=False)
        test = {k: float(v) for k, v in (results[0] if results else {}).items()}
        summary.update(
            status="completed",
            **{"test/top1": test.get("test/top1"), "test/top5": test.get("test/top5"),
               "test/loss": test.get("test/loss")},
            wall_s=wall_before + time.time() - attempt_t0,
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        run = wandb_run(loggers)
        if run is not None:  # the same facts as summary.json, so reports can read either
            run.summary.update({k: v for k, v in summary.data.items()
                                if isinstance(v, (int, float, str)) and v is not None})
            run.summary.update({"axes": axes, "model": {k: v for k, v in
                                                        summary["model"].items()
                                                        if k != "config"}})
        exit_code = 0
        say(log, result_line(summary.data, run_dir))
        return summary.data
    except DivergedError as err:
        summary.update(status="diverged", diverged_step=err.step, diverged_epoch=err.epoch,
                       error=str(err), wall_s=wall_before + time.time() - attempt_t0)
        run = wandb_run(loggers)
        if run is not None:
            run.summary.update({"status": "diverged", "diverged_epoch": err.epoch,
                                "diverged_step": err.step})
        raise
    except (KeyboardInterrupt, SystemExit):
        summary.update(status="interrupted", wall_s=wall_before + time.time() - attempt_t0,
                       interrupted_by=stopper.requested if stopper else "KeyboardInterrupt",
                       requeued=bool(stopper and stopper.requeue))
        exit_code = 255
        if stopper is not None and stopper.requeue:
            finish_wandb(exit_code)
            stopper.requeue_now()  # submitit requeues this job and exits
        raise
    except BaseException as err:
        refused = storage_error(err)
        if refused is not None:
            # A full disk or a folder turned read-only: nothing in the run to fix, and what is
            # on disk is whole (every write is atomic), so the same command resumes later. The
            # summary is best effort: it may not fit on the disk either.
            with contextlib.suppress(OSError):
                summary.update(status="interrupted", interrupted_by=refused.strerror,
                               error=redact(storage_message(refused, run_dir)),
                               wall_s=wall_before + time.time() - attempt_t0)
            raise
        if isinstance(err, DataConfigError):  # found while training, e.g. a corrupt image
            message = data_error_message(err)
            if isinstance(err, ImageReadError):
                # an image broke the loader or a transform: the line names the file and the
                # cause, the traceback (a DataLoader worker's too) is for a bug report
                (run_dir / "error.log").write_text(redact(traceback.format_exc()))
                message += f"; traceback in {run_dir / 'error.log'}"
            summary.update(status="failed", error=redact(message),
                           wall_s=wall_before + time.time() - attempt_t0)
            raise UserError(message) from None
        (run_dir / "error.log").write_text(redact(traceback.format_exc()))
        summary.update(status="failed", error=redact(f"{type(err).__name__}: {err}"),
                       wall_s=wall_before + time.time() - attempt_t0)
        raise
    finally:
        finish_wandb(exit_code)


def shown_path(path: Path) -> str:
    """``path`` relative to the working folder when it is inside it (``outputs/demo/...``)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except (ValueError, OSError):
        return str(path)


def result_line(summary: Mapping[str, Any], run_dir: Path) -> str:
    """A run's result in one line: ``test/top1 94.4  best val/top1 92.8  30 epochs  29 s  ->
    outputs/demo/029503e85c`` (test/top1 is the best validation epoch's checkpoint's)."""
    parts = []
    for key, name in (("test/top1", "test/top1"), ("val/top1_best", "best val/top1")):
        value = summary.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{name} {100 * value:.1f}")
    if summary.get("epochs"):
        parts.append(f"{summary['epochs']} epochs")
    if isinstance(summary.get("wall_s"), (int, float)):
        parts.append(f"{summary['wall_s']:.0f} s")
    return "  ".join([*parts, f"-> {shown_path(run_dir)}"])


def skipped_message(previous: Mapping[str, Any], run_dir: Path) -> str:
    """One line for a re-launched run that failed (or diverged) before: its first error line
    (a failure's message may carry a whole traceback) and how to run it again."""
    lines = str(previous.get("error") or "").strip().splitlines()
    error = lines[0] if lines else "no error recorded"
    if len(error) > 150:
        error = error[:147] + "..."
    return (f"{shown_path(run_dir)}: {previous.get('status')} before ({error}); not run again "
            "without retry_failed=true")


def remove_unstarted_run_folder(run_dir: Path) -> None:
    """Hydra makes the run folder (``.hydra/``, ``train.log``) before caitlab checks the
    config: a rejected config leaves nothing behind. A folder holding anything else (a run's
    files, another process's lock) is left as it is."""
    hydra_dir = run_dir / ".hydra"
    try:
        if {p.name for p in run_dir.iterdir()} - {".hydra", "train.log"}:
            return
        hydra_files = list(hydra_dir.iterdir()) if hydra_dir.is_dir() else []
        if {p.name for p in hydra_files} - {"config.yaml", "hydra.yaml", "overrides.yaml"}:
            return
        for path in hydra_files:
            path.unlink()
        if hydra_dir.is_dir():
            hydra_dir.rmdir()
        (run_dir / "train.log").unlink(missing_ok=True)
        run_dir.rmdir()
        run_dir.parent.rmdir()  # <output_dir>/<name>/, when this was its only run
    except OSError:
        pass  # only ever tidying: whatever could not go stays


def _failed(line: str, multirun: bool, code: int) -> None:
    """Prints a run's one line; exits with ``code``, or in a sweep raises RunFailed."""
    print(line, file=sys.stderr, flush=True)
    if multirun:
        _failed_runs.append(line)
        raise RunFailed(line.removeprefix("caitlab-train: ").removeprefix("error: "))
    sys.exit(code)


def run(cfg: DictConfig) -> float | None:
    """Hydra task: returns the test top-1 (Hydra sweepers can optimise it)."""
    multirun = _is_multirun()
    try:
        summary = train(cfg)
        return summary.get("test/top1")
    except RunFailed as err:  # skipped: it failed before
        _failed(f"caitlab-train: skipped {redact(str(err))}", multirun, 1)
    except UserError as err:
        if not multirun:  # a sweep's failed run keeps its summary for the sweep's table
            remove_unstarted_run_folder(_run_dir(cfg))
        _failed(f"caitlab-train: error: {redact(str(err))}", multirun, 2)
    except (KeyboardInterrupt, SystemExit) as err:
        # Lightning turns Ctrl-C into SystemExit(1) after its graceful shutdown
        status = (read_summary(_run_dir(cfg)) or {}).get("status")
        if isinstance(err, SystemExit) and status != "interrupted":
            raise
        print(f"caitlab-train: interrupted; run the same command again to resume "
              f"({_run_dir(cfg)})", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        refused = storage_error(err)
        if refused is not None:
            _failed(f"caitlab-train: error: {redact(storage_message(refused, _run_dir(cfg)))} "
                    f"(run folder {_run_dir(cfg)})", multirun, 1)
        status = (read_summary(_run_dir(cfg)) or {}).get("status", "failed")
        # one failing run never stops the other runs of its sweep (RunFailed)
        _failed(f"caitlab-train: {status}: "
                f"{redact(str(err)).splitlines()[0] if str(err) else ''}"
                f" (run folder {_run_dir(cfg)})", multirun, 1)
    return None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    return run(cfg)


def _chain(err: BaseException | None) -> list[BaseException]:
    chain: list[BaseException] = []
    while err is not None and all(err is not e for e in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _closest(word: str, options: list[str]) -> str | None:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return match[0] if match else None


def _config_groups() -> list[str]:
    """The config groups (``model``, ``model/residual``...): caitlab's and the project's."""
    groups: set[str] = set()
    for root in (Path(CONF_DIR), Path(os.environ.get("CAITLAB_CONFIG_DIR", "conf"))):
        if root.is_dir():
            groups.update(d.relative_to(root).as_posix() for d in root.rglob("*")
                          if d.is_dir() and not d.name.startswith((".", "_")))
    return sorted(groups)


def _shortlist(options: list[str], width: int = 110) -> str:
    shown = ""
    for i, option in enumerate(options):
        more = f", ... ({len(options)} in all)"
        if len(shown) + len(option) + 2 + (len(more) if i < len(options) - 1 else 0) > width:
            return shown + more
        shown = f"{shown}, {option}" if shown else option
    return shown


def mistyped_name(err: BaseException) -> str | None:
    """One line for a config option or key that does not exist, with the closest existing
    name (difflib) -- Hydra's own message lists every option and its search path."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigKeyError

    chain = _chain(err)
    for e in chain:
        if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options:
            group, _, name = e.missing_cfg_file.rpartition("/")
            head = " ".join(str(e).strip().splitlines()[0].split())
            guess = _closest(name, list(e.options))
            if guess is not None:
                return f"{head}; did you mean {guess}?"
            return f"{head}; {group}= takes one of {_shortlist(list(e.options))}"
    for e in chain:
        parent, key = getattr(e, "parent_node", None), getattr(e, "key", None)
        if not (isinstance(e, (ConfigKeyError, AttributeError)) and isinstance(key, str)
                and parent is not None and "is not in struct" in str(e)):
            continue
        full_key = str(getattr(e, "full_key", None) or key)
        prefix = full_key[:-len(key)] if full_key.endswith(key) else ""
        messages = " ".join(str(x) for x in chain)
        typed = re.search(r"Could not override '([^']+)'", messages)
        override = typed.group(1) if typed else full_key
        rest = override[len(full_key):] if override.startswith(full_key) else ""
        options = [str(k) for k in parent.keys()]
        if not prefix:  # the top level: a key or a config group (model/residual=...)
            options += _config_groups()
        where = prefix.rstrip(".") or "the config"
        line = f"{override}: no key '{key}' in {where}"
        guess = _closest(key, options)
        if guess is not None:
            return f"{line}; did you mean {prefix}{guess}{rest}?"
        # not Hydra's `+key=value` hint: the value may be a secret
        return f"{line} (to add a new key: +{override}=...)"
    return None


def one_line(err: BaseException) -> str:
    """Hydra/OmegaConf errors span lines (hints, option lists, full_key...): one line."""
    known = mistyped_name(err)
    if known is not None:
        return known
    parts = []
    for e in _chain(err):
        # Hydra appends every option of a group and its whole search path
        text = re.split(r"\n\s*(?:Available options in|Config search path)", str(e))[0]
        for line in text.splitlines():
            line = " ".join(line.split())
            if line and not line.startswith(("full_key:", "object_type=", "reference_type=")):
                parts.append(line.rstrip(":"))
    return "; ".join(dict.fromkeys(parts)) or "unknown error"


def main() -> None:
    """``caitlab-train``: Hydra's app, with config mistakes reported in one line.

    ``HYDRA_FULL_ERROR=1`` (or ``--debug``, an alias) shows Hydra's full trace instead.
    """
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    full = debug or os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's printer
    sys.argv[1:] = hide_in_argv(sys.argv[1:])  # before Hydra saves the overrides as typed
    project_on_path()
    try:
        _hydra_main()
    except RunFailed as err:  # Hydra's sweeper re-raises a failed job's, once all have run
        if _failed_runs:
            print(f"caitlab-train: error: {len(_failed_runs)} run(s) of the sweep failed or "
                  "were skipped as failed (lines above); the others ran", file=sys.stderr)
        else:  # the jobs ran elsewhere (submitit): the first failure's line
            print(f"caitlab-train: error: a run of the sweep failed: {err}", file=sys.stderr)
        sys.exit(1)
    except Exception as err:
        if full:
            raise
        # Hydra creates the run folder, its .hydra/ files and train.log before our code runs
        refused = storage_error(err)
        if refused is None:
            message = one_line(err)
        elif refused.errno in DISK_FULL_ERRNOS:
            message = storage_message(refused)
        else:
            message = (f"{storage_message(refused)}; paths.output_dir (or CAITLAB_OUTPUT_DIR) "
                       "must be a writable folder")
        print(f"caitlab-train: error: {redact(message)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
