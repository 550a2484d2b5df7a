"""What ``caitlab-train`` prints: each line once, Lightning's internals in ``train.log`` only.

Hydra's job logging (conf/hydra/default.yaml) sends every record to the console and to the run
folder's ``train.log``. The console handler takes :class:`ConsoleFilter` and
:class:`ConsoleFormatter`; ``train.log`` keeps every line, with its time and logger. Imported
while Hydra configures logging: nothing heavy here.
"""

from __future__ import annotations

import logging
import warnings

# Lightning INFO lines that tell a person nothing about their run: an advert, hardware that
# is absent, loop internals; the checkpoint restored for testing is in the run's result line.
# They stay in train.log.
LIGHTNING_NOISE = (
    "💡 Tip:",
    "TPU available: False",
    "HPU available: False",
    "Loading `train_dataloader` to estimate number of stepping batches",
    "`Trainer.fit` stopped: `max_epochs=",
    "Restoring states from the checkpoint path at",
    "Loaded model weights from the checkpoint at",
)

FILE_ONLY = {"file_only": True}  # ``log.info(line, extra=FILE_ONLY)``: train.log, not console


class ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "file_only", False):
            return False
        if record.name.startswith("lightning") and record.levelno <= logging.INFO:
            message = record.getMessage()
            return not any(message.startswith(noise) for noise in LIGHTNING_NOISE)
        return True


class ConsoleFormatter(logging.Formatter):
    """An INFO line as it is; anything else with its level in front (``WARNING: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return line if record.levelno == logging.INFO else f"{record.levelname}: {line}"


def one_handler_per_line() -> None:
    """Lightning gives its loggers their own console handlers on import (``lightning`` always,
    ``lightning.pytorch``/``lightning.fabric`` when the root logger had none yet): under
    Hydra's job logging every line then printed twice, and some never reached train.log.
    Where the root logger has handlers, Lightning's records go to those alone."""
    if not logging.getLogger().handlers:
        return  # no logging set up (caitlab.train.train called from Python): leave it
    import lightning.pytorch  # noqa: F401 - its first import adds the handlers removed below

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # not a FileHandler someone added
                logger.removeHandler(handler)
        logger.propagate = True


def say(logger: logging.Logger, line: str, *, console: bool = True) -> None:
    """``line`` at INFO on the console and in train.log; printed where logging shows nothing
    (no handler configured), so a result is never silently dropped."""
    if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
        logger.info(line, extra=None if console else FILE_ONLY)
    elif console:
        print(line, flush=True)


def quiet_known_warnings() -> None:
    """Lightning's hints that do not apply: runs outside SLURM on a machine that has srun, and
    a run folder that already holds our own files."""
    for message in (".*`srun` command is available.*", ".*exists and is not empty.*",
                    ".*LeafSpec.*is deprecated.*", ".*does not have many workers.*"):
        warnings.filterwarnings("ignore", message=message)
