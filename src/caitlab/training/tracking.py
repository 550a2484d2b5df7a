"""Experiment tracking: Lightning loggers, with wandb online when it can be and offline when not.

The CSV logger always runs, so every run folder has ``metrics.csv`` whatever else is chosen.
"""

from __future__ import annotations

import contextlib
import csv
import io
import netrc
import os
from pathlib import Path
from typing import Any

from hydra.utils import get_class, instantiate
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig, OmegaConf

from caitlab.runs import write_text_atomic
from caitlab.secrets import redact

WANDB_HOST = "api.wandb.ai"


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run appends to it.

    A full disk costs no row already written: a new column rewrites the file atomically
    (Lightning truncates it first), and an append cut short is cut back to its last whole row.
    """

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(Path(self.metrics_file_path), text.getvalue())

    def save(self) -> None:
        try:
            super().save()
        except OSError:
            with contextlib.suppress(OSError), open(self.metrics_file_path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
            raise


class ResumableCSVLogger(CSVLogger):
    """``metrics.csv`` in the run folder itself, continued across resumed attempts."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(save_dir=str(run_dir), name="", version="")

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode() -> str:
    """``WANDB_MODE`` wins when set; otherwise online with an API key, offline without."""
    mode = os.environ.get("WANDB_MODE")
    if mode == "dryrun":  # wandb's old name for offline, which Lightning's logger sets
        return "offline"
    return mode or ("online" if wandb_api_key_configured() else "offline")


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
            # Lightning passes wandb.init anonymous=None, which wandb >= 0.19 warns about
            # whatever its value (and WANDB_SILENT does not cover): unset means the same.
            init_args = getattr(wandb_logger, "_wandb_init", {})
            if init_args.get("anonymous", "unset") is None:
                del init_args["anonymous"]
            loggers.append(wandb_logger)
        else:
            loggers.append(instantiate(OmegaConf.create(redact(OmegaConf.to_container(
                cfg, resolve=True))), save_dir=str(run_dir)))
    return loggers


def wandb_run(loggers: list[Logger]):
    """The live wandb run behind the loggers, if any."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            return lg.experiment
    return None


def finish_wandb(exit_code: int) -> None:
    """Close the wandb run with its real exit state, so multirun jobs never merge."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        run = wandb.run
        if not run.offline and run.url and os.environ.get("WANDB_SILENT") == "true":
            print(f"wandb: {run.url}")  # the one line of wandb's that silence keeps out
        wandb.finish(exit_code=exit_code)
