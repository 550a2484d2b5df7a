"""Callbacks the end-to-end tests inject into caitlab-train through +callbacks.<name>."""

from __future__ import annotations

import io
import os
import signal
import time

import torch
from lightning.pytorch.callbacks import Callback


class InterruptAtEpochStart(Callback):
    """Sends this process SIGINT (as Ctrl-C would) as epoch ``epoch`` (0-based) starts."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGINT)


def _on_rank(trainer, rank: int | None) -> bool:
    return rank is None or trainer.global_rank == rank


class PoisonLossAt(Callback):
    """Makes the model's output NaN from global step ``step`` on (on rank ``rank`` only, when
    given), to exercise divergence."""

    def __init__(self, step: int = 3, rank: int | None = None) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and _on_rank(trainer, self.rank):
            batch[0].fill_(float("nan"))


class SignalAtStep(Callback):
    """Sends this process ``sig`` once, at the start of global step ``step`` (mid-epoch), or
    as validation ``at_validation`` of epoch ``step`` starts; on rank ``rank`` only, when
    given."""

    def __init__(self, step: int = 5, sig: str = "SIGTERM", rank: int | None = None,
                 at_validation: bool = False) -> None:
        self.step, self.sig, self.sent = step, getattr(signal, sig), False
        self.rank, self.at_validation = rank, at_validation

    def _send(self, trainer, when: int) -> None:
        if when == self.step and not self.sent and _on_rank(trainer, self.rank):
            self.sent = True
            os.kill(os.getpid(), self.sig)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.at_validation:
            self._send(trainer, trainer.global_step)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx,
                                  dataloader_idx=0) -> None:
        if self.at_validation and not trainer.sanity_checking:
            self._send(trainer, trainer.current_epoch)


class CrashAt(Callback):
    """Raises on rank ``rank`` at global step ``step``, as a bug in a training step would."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and _on_rank(trainer, self.rank):
            raise RuntimeError(f"injected crash on rank {self.rank}")


class FailBeforeRendezvous(Callback):
    """Fails as it is built on rank ``rank`` (Lightning's child process, or a SLURM task):
    before that rank joins the others (a missing package, a wrong path on one node)."""

    def __init__(self, rank: int = 1) -> None:
        from caitlab.training.ranks import process_rank

        if process_rank() == rank:
            raise FileNotFoundError(f"injected: rank {rank} cannot start")


class WeightsDigest(Callback):
    """Writes ``weights.rank<k>.txt`` in the run folder as fit ends: a digest of this rank's
    model weights, so that a test can tell every rank ended with the same."""

    def on_train_end(self, trainer, pl_module) -> None:
        import hashlib

        digest = hashlib.sha256()
        for name, value in sorted(pl_module.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        path = os.path.join(trainer.default_root_dir, f"weights.rank{trainer.global_rank}.txt")
        with open(path, "w") as f:
            f.write(digest.hexdigest())


class SigkillAt(Callback):
    """Kills this process with SIGKILL -- no handler, no clean-up, as the OOM killer or a node
    failure would -- at the first moment ``where`` once the global step is >= ``step``:

    - ``batch``: as a training batch starts;
    - ``backward``: after the backward pass, before the optimizer step;
    - ``validation``: as a validation batch starts;
    - ``checkpoint``: halfway through writing a checkpoint's bytes, before its rename.
    """

    WHERE = ("batch", "backward", "validation", "checkpoint")

    def __init__(self, step: int, where: str) -> None:
        if where not in self.WHERE:
            raise ValueError(f"where={where!r}: one of {self.WHERE}")
        self.step, self.where = step, where

    @staticmethod
    def _kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # never reached: SIGKILL to oneself is delivered at once

    def _maybe_kill(self, trainer, where: str) -> None:
        if where == self.where and trainer.global_step >= self.step:
            self._kill()

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.where != "checkpoint":
            return
        save = torch.save

        def torn_save(obj, f, *args, **kwargs):
            if hasattr(f, "write") and trainer.global_step >= self.step:
                buf = io.BytesIO()
                save(obj, buf, *args, **kwargs)
                f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                self._kill()
            return save(obj, f, *args, **kwargs)

        torch.save = torn_save  # this process dies with the patch, the test's is untouched

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._maybe_kill(trainer, "batch")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._maybe_kill(trainer, "backward")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx,
                                  dataloader_idx=0) -> None:
        self._maybe_kill(trainer, "validation")
