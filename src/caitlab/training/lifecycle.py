"""A run's lifecycle in training: whether there is work to do, the attempt, its wall clock and
how it ended, so that the task (``caitlab.training.task.train``) reads as the story of a run.

The folder, its summary and lock are the run record's (``caitlab.record.RunRecord``); this
module decides which state to record, whatever raised: ``completed``, ``diverged``,
``interrupted`` (Ctrl-C, preemption, a full disk: the same command resumes it) or ``failed``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from caitlab import stages
from caitlab.console import say
from caitlab.errors import UserError, storage_error, storage_message
from caitlab.provenance import commit_of, provenance
from caitlab.record import (
    CHECKPOINTS,
    CONFIG,
    OVERRIDES,
    RunBlocked,
    RunFailed,
    RunLock,
    RunRecord,
    check_writable,
    read_summary,
    remove_stale_temp_files,
    skip_reason,
    write_text_atomic,
)
from caitlab.secrets import redact
from caitlab.status import Status
from caitlab.training.ranks import (
    RankWatch,
    error_log_name,
    error_text,
    first_rank_error,
    process_rank,
)
from caitlab.training.reuse import code_note

log = logging.getLogger("caitlab")


def job_overrides() -> list[str]:
    """The overrides of the running Hydra job, as typed (none outside Hydra)."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def job_run_dir(cfg: DictConfig) -> Path:
    """The running Hydra job's folder; outside Hydra (tests), the configured one."""
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path(cfg.paths.run_dir)


def slurm_job_id() -> str | None:
    """This job's id as squeue shows it (``1234_5`` for a task of an array)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def is_rank_zero() -> bool:
    """Only global rank 0 writes the run folder (under SLURM every task runs this app; on
    one machine Lightning starts the other ranks as copies of this command, with LOCAL_RANK
    and, across machines, NODE_RANK set, and no RANK)."""
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        if os.environ.get(var) not in (None, "0") and (
            var != "SLURM_PROCID" or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        ):
            return False
    return True


class RankDone(SystemExit):
    """A rank other than 0 whose part of an interrupted attempt is done: it exits 0, so that
    neither SLURM's ``--kill-on-bad-exit`` nor rank 0's watch (``RankWatch``) ends rank 0
    before it has recorded the interruption and, under submitit, requeued the job."""

    def __init__(self) -> None:
        super().__init__(0)


def shown_path(path: Path) -> str:
    """``path`` relative to the working folder when it is inside it (``outputs/demo/...``)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except (ValueError, OSError):
        return str(path)


def result_line(summary: Mapping[str, Any], run_dir: Path) -> str:
    """A run's result in one line: ``test/top1 94.4  best val/top1 92.8  30 epochs  29 s  ->
    outputs/demo/029503e85c`` (test/top1 scores the checkpoint its data's ``selection`` names)."""
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


class Run:
    """One run folder, from the check that there is work to do to the state it ended in.

    ``done`` (skip or refuse a re-launch), ``refuse`` (a config error, before the folder is
    made), ``open`` (folder, lock, config files), ``start`` (summary, provenance, the
    checkpoint to resume from), ``attempt`` (records how the attempt ended), ``complete``.
    """

    def __init__(self, run_dir: Path, name: str = "default",
                 stage: dict[str, Any] | None = None) -> None:
        self.dir = Path(run_dir)
        self.name = name
        self.stage = stage or {}  # a chain's stage: its summary facts (caitlab.stages)
        self.rank_zero = is_rank_zero()
        self.rank = process_rank()  # the trainer's own, once it exists (uses)
        self.watch: RankWatch | None = None
        self.previous = read_summary(self.dir)
        self.summary = RunRecord(self.dir, writable=False)  # until start()
        self.resume_from: Path | None = None
        self.loggers: list = []  # the attempt's loggers: wandb's run mirrors the summary
        self.stopper: Any = None  # the attempt's GracefulStop: who interrupted, and requeue
        self._lock: RunLock | None = None
        self._t0 = time.time()
        self._wall_before = 0.0
        self._devices = 1  # the attempt's processes (GPUs, or CPU ranks) until trainer's known
        self._device_h_before = 0.0

    @classmethod
    def of(cls, cfg: DictConfig) -> Run:
        return cls(job_run_dir(cfg), str(cfg.get("name", "default")),
                   stages.stage_facts(cfg.get("stage"), cfg.get("stages") or {}))

    def _sweep_facts(self) -> dict[str, Any]:
        """What a sweep's table needs of a run that never started."""
        return {"overrides": redact(job_overrides()), "name": self.name,
                "signature": self.dir.name, **self.stage}

    def done(self, retry_failed: bool) -> dict[str, Any] | None:
        """The previous summary of a completed run (nothing to do); raises ``RunFailed`` for
        one that failed or diverged before, unless ``retry_failed``."""
        reason = skip_reason(self.previous, retry_failed)
        if reason == Status.COMPLETED and self.previous is not None:  # (a summary gave it)
            say(log, f"already completed, skipping: {result_line(self.previous, self.dir)}"
                     f"{code_note(self.previous)}")
            return self.previous
        if reason is not None and self.previous is not None:
            raise RunFailed(skipped_message(self.previous, self.dir))
        return None

    def refuse(self, message: str) -> UserError:
        """A config the run cannot start with; in a sweep its summary says so, for the
        sweep's table."""
        if is_multirun():
            RunRecord(self.dir, self._sweep_facts()).fail(redact(message))
        return UserError(message)

    def upstreams(self, cfg: DictConfig) -> dict[str, str]:
        """{key: checkpoint} for each of the config's stage references (``caitlab.stages``):
        the upstream runs' best checkpoints. Raises ``RunBlocked`` (the summary says
        ``blocked``) where an upstream has not completed, ``UserError`` for a reference the
        sweep did not write."""
        found = {}
        for key in stages.REFERENCE_KEYS:
            value = OmegaConf.select(cfg, key)
            if not stages.is_reference(value):
                continue
            try:
                found[key] = stages.upstream(key, value, self.dir)
            except stages.StageError as err:
                raise self.refuse(str(err)) from None
            except RunBlocked as err:
                if is_multirun():
                    RunRecord(self.dir, self._sweep_facts()).block(err.upstream, str(err))
                raise
        return found

    def open(self, cfg: DictConfig) -> dict[str, Any]:
        """Makes the folder, takes its lock and writes ``config.yaml`` and ``overrides.yaml``;
        returns the resolved config, secrets redacted."""
        try:
            check_writable(self.dir)
        except OSError as err:
            raise UserError(f"paths.output_dir: cannot write the run folder {self.dir}: "
                            f"{err.strerror or err}") from None
        if self.rank_zero:
            self._lock = RunLock(self.dir)
            if not self._lock.acquire():
                raise UserError(f"{self.dir} is being trained by another process "
                                f"({self._lock.holder()}); not starting it twice")
            remove_stale_temp_files(self.dir)  # held: their writers are dead
        resolved = redact(OmegaConf.to_container(cfg, resolve=True))
        if self.rank_zero:
            write_text_atomic(self.dir / CONFIG,
                              OmegaConf.to_yaml(OmegaConf.create(resolved)))
            write_text_atomic(self.dir / OVERRIDES,
                              OmegaConf.to_yaml(OmegaConf.create(redact(job_overrides()))))
        return resolved

    def start(self, facts: dict[str, Any]) -> None:
        """A new attempt: the summary with ``facts`` (identity, model, axes...), the code it
        runs and the checkpoint it resumes from."""
        from caitlab.models.checkpoint import (  # torch: off caitlab-train --help's path
            ResumeError,
            resume_checkpoint,
        )

        try:
            self.resume_from = resume_checkpoint(self.dir / CHECKPOINTS)
        except ResumeError as err:
            raise UserError(str(err)) from None
        self.summary = RunRecord(self.dir, facts, writable=self.rank_zero)
        self._t0, self._wall_before = time.time(), self.summary.get("wall_s", 0.0) or 0.0
        self._device_h_before = self.summary.get("device_hours", 0.0) or 0.0
        code, diff = provenance()
        before, now = commit_of(self.summary.data), commit_of({"provenance": code})
        if self.resume_from and before and before != now:
            say(log, f"resuming {shown_path(self.dir)}, started by code {before}, with code "
                     f"{now}: its weights may not match an uninterrupted run's")
        if self.rank_zero and diff:  # the uncommitted changes the run's numbers depend on
            write_text_atomic(self.dir / "code.diff", redact(diff))
        self.summary.start(resumed_from=str(self.resume_from) if self.resume_from else None,
                           slurm_job_id=slurm_job_id(), provenance=code,
                           # the local launcher's job (its logs: caitlab-sweep log)
                           submitit_job_id=os.environ.get("SUBMITIT_LOCAL_JOB_ID"))
        if self.resume_from:  # Lightning's own line about it is in train.log only
            say(log, f"resuming {shown_path(self.dir)} from {self.resume_from.name} "
                     f"(attempt {self.summary['attempts']})")

    def wall_s(self) -> float:
        """Seconds trained, summed over attempts."""
        return self._wall_before + time.time() - self._t0

    def uses(self, trainer: Any) -> None:
        """The attempt's trainer: its devices (``world_size`` of them, ``cuda`` or ``cpu``),
        what the device-hours count; under DDP on one machine rank 0 watches the others."""
        # the trainer's own ranks are set only as fit starts: the environment's are the same
        self._devices, self.rank = trainer.world_size, process_rank(trainer.num_devices)
        self.summary.update(world_size=trainer.world_size,
                            device=trainer.strategy.root_device.type)
        if self.rank_zero and trainer.world_size > 1:
            self.watch = RankWatch(trainer, self.dir, self._rank_died,
                                   stopping=lambda: bool(self.stopper and self.stopper.signalled)
                                   ).start()

    def _rank_died(self, message: str) -> None:
        self.summary.fail(redact(message), **self.clock())

    def device_hours(self) -> float:
        """Wall time x devices, summed over attempts (an attempt killed before it could write
        its end, by SIGKILL or a node failure, is counted up to its last validation)."""
        return self._device_h_before + (time.time() - self._t0) * self._devices / 3600

    def clock(self) -> dict[str, float]:
        """The run's clocks as the summary keeps them: ``wall_s`` and ``device_hours``."""
        return {"wall_s": self.wall_s(), "device_hours": round(self.device_hours(), 6)}

    def complete(self, test: Mapping[str, float]) -> dict[str, Any]:
        """The run's final result: the test metrics in the summary (and wandb's)."""
        self.summary.complete(**self.clock(), **{k: test.get(k) for k in (
            "test/top1", "test/top5", "test/loss")})
        self._mirror({k: v for k, v in self.summary.data.items()
                      if isinstance(v, (int, float, str)) and v is not None})
        self._mirror({"axes": self.summary.get("axes"),
                      "model": {k: v for k, v in (self.summary.get("model") or {}).items()
                                if k != "config"},
                      # which checkpoint test/top1 scores: a report from wandb reads it there
                      **({"selection": self.summary["selection"]}
                         if self.summary.get("selection") is not None else {})})
        say(log, result_line(self.summary.data, self.dir))
        return self.summary.data

    def _mirror(self, values: dict[str, Any]) -> None:
        """The same facts in wandb's run summary as in summary.json: reports read either."""
        from caitlab.training.tracking import wandb_run  # torch: off caitlab-train --help's path

        if not self.rank_zero:  # other ranks hold Lightning's stand-in for the wandb run
            return
        run = wandb_run(self.loggers)
        if run is not None:
            run.summary.update(values)

    @contextlib.contextmanager
    def attempt(self) -> Iterator[Run]:
        """Around training: records a divergence, an interruption or a failure (the line
        for it is the caller's), re-raises it, and closes wandb with the attempt's exit code."""
        from caitlab.data import DataConfigError  # torch: off caitlab-train --help's path
        from caitlab.training.module import DivergedError  # torch: off caitlab-train --help's path
        from caitlab.training.tracking import finish_wandb  # torch: off caitlab-train --help's path

        exit_code = 1
        try:
            yield self
            exit_code = 0
        except DivergedError as err:
            self.summary.diverge(err.epoch, err.step, str(err), **self.clock())
            # the string: wandb writes an Enum member by its name
            self._mirror({"status": Status.DIVERGED.value, "diverged_epoch": err.epoch,
                          "diverged_step": err.step})
            raise
        except (KeyboardInterrupt, SystemExit):
            stopper = self.stopper
            self.summary.interrupt(stopper.requested if stopper else "KeyboardInterrupt",
                                   requeued=bool(stopper and stopper.requeue), **self.clock())
            exit_code = 255
            if stopper is not None and stopper.requeue:
                finish_wandb(exit_code)
                stopper.requeue_now()  # on rank 0 submitit requeues this job and exits
            if not self.rank_zero and stopper is not None and stopper.signalled:
                # the checkpoint is written (a collective save): the rest is rank 0's
                raise RankDone() from None
            raise
        except DataConfigError as err:  # found while training, e.g. a corrupt image
            raise self._failed_on_data(err) from None
        except BaseException as err:
            self._failed(err)
            raise
        finally:
            if self.watch is not None:
                self.watch.stop()
            finish_wandb(exit_code)

    def _failed_on_data(self, err: Exception) -> UserError:
        from caitlab.data import ImageReadError, data_error_message  # torch: off --help's path

        message = data_error_message(err)
        if isinstance(err, ImageReadError):
            # the line names the file and the cause; the traceback (a DataLoader worker's
            # too) is for a bug report
            log_file = self.dir / error_log_name(self.rank)
            log_file.write_text(redact(traceback.format_exc()))
            message += f"; traceback in {log_file}"
        self.summary.fail(redact(message), **self.clock())
        return UserError(message)

    def _failed(self, err: BaseException) -> None:
        refused = storage_error(err)
        if refused is not None:
            # A full disk or a folder turned read-only: nothing in the run to fix, and what is
            # on disk is whole (every write is atomic), so the same command resumes later. The
            # summary is best effort: it may not fit on the disk either.
            with contextlib.suppress(OSError):
                self.summary.interrupt(str(refused.strerror), **self.clock(),
                                       error=redact(storage_message(refused, self.dir)))
            return
        error = f"{type(err).__name__}: {err}"
        (self.dir / error_log_name(self.rank)).write_text(
            redact(error_text(error, traceback.format_exc())))
        others = first_rank_error(self.dir) if self.rank_zero else None
        if others is None:
            self.summary.fail(redact(error), **self.clock())
            return
        # the rank that failed first holds the cause; this one's is what followed
        first, by_rank = others
        self.summary.fail(redact(f"{first}; rank 0: {error}"), **self.clock(),
                          rank_errors={k: redact(v) for k, v in by_rank.items()})
