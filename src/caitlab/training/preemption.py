"""Stopping a run at a safe point: Ctrl-C, SIGTERM, and SLURM preemption or time-out.

One mechanism for every stop request. A signal only raises a flag (Lightning's own
``received_sigterm``, which Lightning broadcasts from rank 0 under DDP); at the next batch
boundary the run stops with ``SIGTERMException``, ``last.ckpt`` is written atomically with
the loop and data position, and the run is marked ``interrupted``. Resuming then continues
with the very next batch, so an interrupted run ends with the weights of an uninterrupted one.

Under submitit, the preemption/time-out signal (USR2 by default) is taken over the same way:
once the checkpoint is on disk, submitit's own handler runs and requeues the job. Lightning's
SLURM auto-requeue (USR1) is switched off so the two never fight.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from caitlab import compat
from caitlab.cpus import available_cpus
from caitlab.record import AtomicWrite, write_atomic

if TYPE_CHECKING:
    from types import FrameType

    from lightning.pytorch import LightningModule, Trainer


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file, fsync'ed, then renamed over the old one:
    a process killed at any moment leaves the previous checkpoint or the new one, never half.
    Loading is ``weights_only`` (a checkpoint file cannot run code), to the CPU: under DDP
    every rank reads the file rank 0 wrote, and its CUDA tensors would all land on rank 0's
    device; Lightning moves what it restores to each rank's own."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any = None) -> None:
        write_atomic(Path(path), lambda f: torch.save(checkpoint, f), binary=True,
                     sync_folder=True)

    def load_checkpoint(self, path: str | Path, map_location: Any = "cpu",
                        weights_only: bool | None = True) -> dict[str, Any]:
        # Lightning types map_location as a callable; it hands it to torch.load, which
        # takes a device's name too
        return super().load_checkpoint(path, map_location=cast(Callable, map_location or "cpu"),
                                       weights_only=True)


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """:class:`AtomicCheckpointIO`'s writes taken off the training loop, as far as the
    device lets them: what waits on the disk always, the serialisation too where it runs
    beside a device that computes without the CPU.

    - **GPU training, or CPU training with a core to spare** (``serialize_in_loop=False``):
      Lightning's ``AsyncCheckpointIO`` copies the checkpoint's tensors on the caller's
      thread (a point-in-time copy, on their device) and its writer thread serialises,
      writes, fsyncs and renames the copy while training goes on. The write starts with the
      next training batch (``ReleaseWrites``): serialising is mostly Python, and beside the
      epoch end's Python (validation, logging, the summary) it would take the GIL from it.
    - **CPU training with a torch thread per core** (``serialize_in_loop=True``, the default
      ``threads=auto``; ``ReleaseWrites`` sets it): no core is free, so a serialising thread
      only takes one from the next step's threads, which all wait for the slowest (digits:
      the background write cost the epoch's first step 13 ms, more than the 9-10 ms of
      serialising in the loop). There the checkpoint is written to its temporary file in the
      loop, with no copy, and only the fsyncs and the rename, which wait on the disk and not
      on a core, go to the thread.

    Each save first waits for the one before it, so every checkpoint is on disk before the
    next one begins; fit's end, an exception and a stop all pass through Lightning's
    teardown, which waits for the last. What a kill at any moment leaves is unchanged: the
    write is a temporary file renamed over the old one (a kill before the rename leaves the
    previous checkpoint, and a resume from it trains the same steps again to the same
    weights). A failed write (a full disk) is raised by the next save or by teardown, naming
    its file.
    """

    def __init__(self, serialize_in_loop: bool = False) -> None:
        super().__init__(AtomicCheckpointIO())
        self.serialize_in_loop = serialize_in_loop
        self._gate = threading.Event()
        self._gate.set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any = None) -> None:
        self.wait()
        if self.serialize_in_loop:
            pending = AtomicWrite(Path(path), lambda f: torch.save(checkpoint, f), binary=True)
            self.then(lambda: pending.commit(sync_folder=True))
            return
        self._gate.clear()
        self.then(self._gate.wait)
        super().save_checkpoint(checkpoint, path, storage_options)

    def release(self) -> None:
        """Lets the queued writes start (at the next training batch: ``ReleaseWrites``)."""
        self._gate.set()

    def teardown(self) -> None:
        self._gate.set()
        super().teardown()

    def then(self, fn: Callable[[], Any]) -> None:
        """Runs ``fn()`` in the writer thread once the writes queued before it are done (a
        file made from a checkpoint being written); its error is raised as a write's is."""
        compat.async_io_submit(self, fn)

    def wait(self) -> None:
        """Returns once every queued write is done; raises the first that failed."""
        self._gate.set()
        compat.async_io_wait(self)


class ReleaseWrites(Callback):
    """Sets :class:`BackgroundCheckpointIO`'s mode from the trainer's device and threads,
    and starts its queued writes as the next training batch starts (teardown, a stop and the
    next save start them too)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        if isinstance(io, BackgroundCheckpointIO):
            io.serialize_in_loop = every_core_busy(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        io = trainer.strategy.checkpoint_io
        if isinstance(io, BackgroundCheckpointIO):
            io.release()


def every_core_busy(trainer: Trainer) -> bool:
    """Whether the trainer's ranks on this machine train on the CPU with a torch thread for
    every core this process may use (``threads=auto``, the default)."""
    return (trainer.strategy.root_device.type == "cpu"
            and torch.get_num_threads() * trainer.num_devices >= available_cpus())


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors and plain values (weights_only)."""
    # legacy=True, the default, named: numpy's stub types the default as legacy=False's dict
    state = np.random.get_state(legacy=True)
    assert isinstance(state, tuple)  # legacy's
    name, keys, pos, has_gauss, gauss = state
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def submitit_signal() -> signal.Signals | None:
    """The preemption/time-out signal submitit listens to, when this is a submitit job."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, f"SIG{name}", None)


class GracefulStop(Callback):
    """Turns stop requests into a checkpoint at the next batch boundary (see module doc).

    Under DDP a signal may reach one rank, or each at a slightly different moment: a rank
    only notes it, and at every training and validation batch the ranks agree (one small
    all-reduce) whether any was asked to stop, and with which signal. All of them then stop
    at the same batch, write ``last.ckpt`` once together, and rank 0 alone requeues."""

    def __init__(self, last_ckpt: Path) -> None:
        self.last_ckpt = Path(last_ckpt)
        self.requested: str | None = None
        self.requeue = False
        self._trainer: Trainer | None = None
        self._previous: dict[int, Any] = {}
        self._signum = 0  # the signal this rank received, until the ranks agree

    # --- signals ---------------------------------------------------------------------------

    def _request(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self._signum:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self._signum = int(signum)
        if signum == signal.SIGINT:
            print("\ncaitlab: stopping at the next batch and saving last.ckpt "
                  "(Ctrl-C again to stop at once)", flush=True)
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            self._agree_on(self._signum)
            if trainer is not None:
                compat.request_stop(trainer)

    @property
    def signalled(self) -> bool:
        """Whether this process was asked to stop (agreed with the other ranks or not)."""
        return bool(self._signum)

    def _agree_on(self, signum: int) -> None:
        self.requested = signal.Signals(signum).name
        self.requeue = signum == submitit_signal()

    def _install(self) -> None:
        for sig in self._previous:
            signal.signal(sig, self._request)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self._previous:
            return
        self._trainer = trainer
        wanted = [signal.SIGINT, signal.SIGTERM]
        if (sig := submitit_signal()) is not None:
            wanted.append(sig)
        for sig in wanted:
            self._previous[sig] = signal.getsignal(sig)
        self._install()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning puts its own SIGTERM handler first after setup: on rank 0 it signals the
        # other ranks' processes, and on any rank it broadcasts from inside the handler, a
        # collective the other ranks do not join. Ours alone decides.
        self._install()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for sig, handler in self._previous.items():
            if sig != submitit_signal():  # submitit's handler goes back in requeue_now()
                signal.signal(sig, handler)

    # --- the safe point --------------------------------------------------------------------

    def _ranks_agree_to_stop(self, trainer: Trainer) -> bool:
        """Whether any of the ranks was asked to stop (each calls this at the same batch)."""
        # submitit's signal (a requeue) wins over the others, so that a preemption seen by
        # one rank requeues the job: its rank in the high bits, the signal in the low
        mine = self._signum and (256 * (self._signum == submitit_signal()) + self._signum)
        flag = torch.tensor([mine], device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item()) % 256
        if signum:
            self._agree_on(signum)
            compat.request_stop(trainer)
        return bool(signum)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # alone, a flag raised while the batch was fetched stops before it trains
        if trainer.world_size == 1 and trainer.received_sigterm:
            raise SIGTERMException

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        # Agreed as a batch ends, so that Lightning stops every rank before it fetches the
        # next batch: a stop at the next batch's start would follow its transfer, whose
        # random erasing has drawn from the RNGs the checkpoint then saves one batch ahead.
        if trainer.world_size > 1:
            self._ranks_agree_to_stop(trainer)

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule,
                                  batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        # Lightning's evaluation loop stops after the batch once the flag is raised, on
        # every rank alike now that they agreed
        if trainer.world_size > 1 and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._ranks_agree_to_stop(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.last_ckpt)

    def requeue_now(self) -> None:
        """Hands over to submitit's handler, which requeues this job and exits (on rank 0;
        on the other ranks it returns)."""
        sig = submitit_signal()
        handler = self._previous.get(sig) if sig is not None else None
        if sig is not None and callable(handler):
            signal.signal(sig, handler)
            handler(sig, None)
