"""Lightning callbacks that keep a run folder readable while the run goes on."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar

from caitlab import compat
from caitlab.console import say
from caitlab.record import RunRecord
from caitlab.record.sweep import THROUGHPUT_RULE, throughput
from caitlab.training.preemption import BackgroundCheckpointIO

log = logging.getLogger("caitlab")


class SummaryCallback(Callback):
    """Keeps ``summary.json`` current at every validation, so sweeps can be read live."""

    def __init__(self, summary: RunRecord, clock: Callable[[], dict[str, float]]) -> None:
        # the run's clocks over all attempts (wall_s, device_hours: caitlab.training.lifecycle)
        self.summary, self.clock = summary, clock

    # on_validation_end, not on_validation_epoch_end: the module logs the epoch's metrics in
    # its own on_validation_epoch_end, which Lightning calls after the callbacks'.
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        values: dict[str, Any] = {"epochs": trainer.current_epoch + 1,
                                  "global_step": trainer.global_step, **self.clock()}
        logged = metrics.get("val/top1")
        if logged is not None:
            top1 = float(logged)
            best = self.summary.get("val/top1_best")
            values["val/top1"] = top1
            values["val/top1_best"] = top1 if best is None else max(best, top1)
        # validation runs before on_train_epoch_end: read the epoch's throughput directly
        if getattr(pl_module, "images_per_s", None) is not None:
            # every epoch's figure is kept (across resumes too); the run is credited with
            # their median after the first, which pays for warm-up
            by_epoch = dict(self.summary.get("images_per_s_by_epoch") or {})
            by_epoch[str(trainer.current_epoch)] = pl_module.images_per_s
            values["images_per_s_by_epoch"] = by_epoch
            values["images_per_s"] = throughput({int(e): v for e, v in by_epoch.items()})
            values["images_per_s_rule"] = THROUGHPUT_RULE
        self.summary.update(**values)


@compat.routes_saves
class BestCheckpoint(ModelCheckpoint):
    """The best checkpoint by a metric, written as a hard link to ``latest``'s file when that
    was saved at the same step (the usual case: both are saved at every epoch end).

    The two files would hold the same weights, optimizer and loop state; serialising and
    fsync'ing them twice per epoch doubled the cost of checkpointing. ``latest`` replaces its
    file by rename, so the link keeps pointing at this epoch's contents after ``last.ckpt``
    moves on. The link is made under a temporary name and renamed: atomic like every save.
    ``latest`` must come before this callback in the trainer's callback list.
    """

    def __init__(self, *args: Any, latest: ModelCheckpoint, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.latest = latest

    def to_score(self, scored: str) -> str | None:
        """The checkpoint file the test scores.

        Args:
            scored: ``best`` (this callback's file) or ``last`` (``latest``'s: the end of
                training), as the data's ``selection()`` says.

        Returns:
            The path; None where no such file was written (the test then scores the weights
            in memory, which are the last).
        """
        if scored not in ("best", "last"):
            raise ValueError(f"scored: 'best' or 'last', got {scored!r}")
        # latest monitors nothing: Lightning keeps its newest file as its best_model_path
        return (self.best_model_path if scored == "best" else self.latest.best_model_path) or None

    def save(self, trainer: Trainer, filepath: str) -> None:
        step, source = compat.last_save(self.latest)
        if step != trainer.global_step or not source or self.save_weights_only:
            compat.lightning_save(self, trainer, filepath)
            return
        if trainer.is_global_zero:
            def link() -> None:
                _link_atomic(Path(source), Path(filepath))

            io = trainer.strategy.checkpoint_io
            # latest's file may still be in the writer thread: link once it is renamed
            io.then(link) if isinstance(io, BackgroundCheckpointIO) else link()
        compat.record_save(self, trainer, filepath)


def _link_atomic(source: Path, target: Path) -> None:
    """``target`` becomes ``source``'s contents in one rename (a hard link, or a copy where
    the filesystem has none)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SteadyProgressBar(RichProgressBar):
    """Rich's progress bar, its training line updated at most every ``interval`` seconds.

    Lightning redraws the bar and re-reads every progress-bar metric after each batch: about
    half a millisecond a step, several percent of a small model's epoch on a CPU. A person
    sees no difference at ten updates a second; the epoch's last batch always shows.
    """

    def __init__(self, interval: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.interval = interval
        self._shown_at = float("-inf")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        now = time.monotonic()
        last = batch_idx + 1 >= self.total_train_batches
        if not last and now - self._shown_at < self.interval:
            return
        self._shown_at = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class EpochLines(Callback):
    """One line per epoch with its metrics, in train.log and (``console=True``, where no
    progress bar shows them) on the console::

        epoch 3/30  train/loss 1.234  val/loss 1.100  val/top1 85.1  4.2 s

    The module logs the epoch's training loss in its own ``on_train_epoch_end``, which
    Lightning calls after the callbacks': the line is written as the next epoch starts, or
    as training ends. Accuracies in percent; the time is the epoch's, validation included.
    """

    def __init__(self, console: bool = True) -> None:
        self.console = console
        self._t0 = time.monotonic()
        self._ended: tuple[int, float] | None = None  # (epoch, its duration) not yet written
        self._validated = -1

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)
        self._t0 = time.monotonic()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = trainer.current_epoch

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ended = (trainer.current_epoch, time.monotonic() - self._t0)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        self._write(trainer)

    def _write(self, trainer: Trainer) -> None:
        if self._ended is None or not trainer.is_global_zero:
            self._ended = None
            return
        epoch, seconds = self._ended
        self._ended = None
        metrics = trainer.callback_metrics
        total = trainer.max_epochs if (trainer.max_epochs or -1) > 0 else None
        parts = [f"epoch {epoch + 1}/{total}" if total else f"epoch {epoch + 1}"]
        shown = [("train/loss_epoch", "train/loss", False)]
        if self._validated == epoch:  # otherwise the values are an earlier epoch's
            shown += [("val/loss", "val/loss", False), ("val/top1", "val/top1", True)]
        for key, name, percent in shown:
            logged = metrics.get(key)
            if logged is not None:
                value = float(logged)
                parts.append(f"{name} {100 * value:.1f}" if percent else f"{name} {value:.3f}")
        parts.append(f"{seconds:.1f} s")
        say(log, "  ".join(parts), console=self.console)
