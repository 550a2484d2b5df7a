"""Experiment tracking: Lightning loggers, with wandb online when it can be and offline when not.

The CSV logger always runs, so every run folder has ``metrics.csv`` whatever else is chosen.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from caitlab import compat
from caitlab.record import write_text_atomic
from caitlab.secrets import redact, wandb_mode

if TYPE_CHECKING:
    from lightning.pytorch.loggers import WandbLogger


class _AppendingWriter:
    """``metrics.csv`` as Lightning's CSV logger writes it (one row per logged step, a
    ``step`` column, columns sorted, rows written in batches by ``save``), continued when the
    file exists: Lightning's writer deletes it, a resumed run appends to it.

    A full disk costs no row already written: a new column rewrites the file atomically
    (Lightning truncates it first), and an append cut short is cut back to its last whole row.
    """

    def __init__(self, log_dir: str) -> None:
        self.metrics_file_path = os.path.join(log_dir, "metrics.csv")
        self.metrics: list[dict[str, Any]] = []  # rows not written yet
        self.metrics_keys: list[str] = []
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])
        os.makedirs(log_dir, exist_ok=True)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self.metrics.append({**{k: v.item() if isinstance(v, torch.Tensor) else v
                                for k, v in metrics.items()}, "step": step})

    def save(self) -> None:
        if not self.metrics:
            return
        new_keys = set().union(*self.metrics) - set(self.metrics_keys)
        self.metrics_keys = sorted([*self.metrics_keys, *new_keys])
        exists = os.path.isfile(self.metrics_file_path)
        if new_keys and exists:
            self._rewrite_with_header()
        try:
            with open(self.metrics_file_path, "a" if exists else "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                if not exists:
                    writer.writeheader()
                writer.writerows(self.metrics)
        except OSError:
            with contextlib.suppress(OSError), open(self.metrics_file_path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
            raise
        self.metrics = []

    def _rewrite_with_header(self) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(Path(self.metrics_file_path), text.getvalue())


class ResumableCSVLogger(Logger):
    """``metrics.csv`` in the run folder itself, continued across resumed attempts; written
    every ``flush_every_n_steps`` logged steps, as Lightning's CSVLogger, and at the end.

    Hyperparameters are not logged: the run folder's ``config.yaml`` holds its config."""

    def __init__(self, run_dir: Path, flush_every_n_steps: int = 100) -> None:
        super().__init__()
        self.run_dir, self.flush_every_n_steps = Path(run_dir), flush_every_n_steps
        self.writer: _AppendingWriter | None = None

    name = ""
    version = ""

    @property
    def save_dir(self) -> str:
        return str(self.run_dir)

    @property
    def log_dir(self) -> str:
        return str(self.run_dir)

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self.writer is None:
            self.writer = _AppendingWriter(log_dir=self.log_dir)
        return self.writer

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if step is None:
            step = len(self.experiment.metrics)
        self.experiment.log_metrics(metrics, step)
        if (step + 1) % self.flush_every_n_steps == 0:
            self.save()

    @rank_zero_only
    def save(self) -> None:
        if self.writer is not None:
            self.writer.save()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()


def _is_wandb(target: str) -> bool:
    return target.rsplit(".", 1)[-1] == "WandbLogger"


def build_loggers(
    logger_cfg: DictConfig | None,
    run_dir: Path,
    *,
    name: str,
    group: str,
    tags: list[str],
    config: dict[str, Any],
    wandb_id: str | None,
) -> list[Logger]:
    loggers: list[Logger] = [ResumableCSVLogger(run_dir)]
    for cfg in (logger_cfg or {}).values():
        if cfg is None or "_target_" not in cfg:
            continue
        if _is_wandb(cfg._target_):
            mode = wandb_mode()
            # wandb's own lines (banner, settings notes, a 40-line run summary) are kept out
            # of the run's output; WANDB_SILENT=false brings them back. What a person needs
            # from it is said here: where offline runs are, and how to upload them.
            os.environ.setdefault("WANDB_SILENT", "true")
            if mode == "offline":
                print(f"wandb: no API key configured, logging offline; upload later with: "
                      f"wandb sync {run_dir / 'wandb'}/offline-run-*")
            # wandb.init's `config` clashes with instantiate's own first argument
            kwargs = {k: v for k, v in redact(OmegaConf.to_container(cfg, resolve=True)).items()
                      if k != "_target_"}
            wandb_logger = get_class(cfg._target_)(
                **kwargs, save_dir=str(run_dir), name=name, group=group, tags=tags, id=wandb_id,
                resume="allow", offline=mode == "offline", mode=mode, config=config,
                reinit="finish_previous",
            )
            compat.unset_wandb_anonymous(wandb_logger)
            loggers.append(wandb_logger)
        else:
            loggers.append(instantiate(OmegaConf.create(redact(OmegaConf.to_container(
                cfg, resolve=True))), save_dir=str(run_dir)))
    return loggers


def wandb_run(loggers: list[Logger]) -> Any:
    """The live wandb run behind the loggers, if any."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":  # known by its name: not imported here
            return cast("WandbLogger", lg).experiment
    return None


def finish_wandb(exit_code: int) -> None:
    """Close the wandb run with its real exit state, so multirun jobs never merge."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        run = wandb.run
        if not run.offline and run.url and os.environ.get("WANDB_SILENT") == "true":
            print(f"wandb: {run.url}")  # the one line of wandb's that silence keeps out
        wandb.finish(exit_code=exit_code)
