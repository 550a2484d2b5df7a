"""Callbacks the end-to-end tests inject into caitlab-train through +callbacks.<name>."""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class InterruptAtEpochStart(Callback):
    """Sends this process SIGINT (as Ctrl-C would) as epoch ``epoch`` (0-based) starts."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGINT)


class PoisonLossAt(Callback):
    """Makes the model's output NaN from global step ``step`` on, to exercise divergence."""

    def __init__(self, step: int = 3) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            batch[0].fill_(float("nan"))


class SignalAtStep(Callback):
    """Sends this process ``sig`` once, at the start of global step ``step`` (mid-epoch)."""

    def __init__(self, step: int = 5, sig: str = "SIGTERM") -> None:
        self.step, self.sig, self.sent = step, getattr(signal, sig), False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.sig)
