"""One run per slot of the machine in a local sweep: its own GPU(s) and its share of the cores.

``hydra/launcher=local`` (submitit's local executor) starts every job of a sweep at once: on
a GPU machine they all train on GPU 0, on a CPU machine they fight over the cores (see
``caitlab.cpus``). With ``cluster.slots=true`` the machine is cut into slots, and each job,
when it starts, claims a free one and waits while none is:

- a GPU machine (``trainer.accelerator`` gpu, or auto with GPUs): ``len(gpus) //
  trainer.devices`` slots, each ``trainer.devices`` GPUs and an even share of the cores;
- otherwise: ``cores // cpus_per_task`` slots (``hydra.launcher.cpus_per_task``, from
  ``cluster.cpus_per_task``), each ``cpus_per_task`` cores;

always at least one. A slot is claimed with an exclusive ``flock`` on
``<sweep folder>/.slots/<i>.lock``, held for the life of the job's process: the kernel drops
it however the job ends, so a killed run never keeps its slot. The job then sees only its
GPUs (``CUDA_VISIBLE_DEVICES``, set before CUDA starts) and runs on its cores
(``sched_setaffinity``), so torch's threads and the data workers follow
(``caitlab.cpus.available_cpus``). The slot a run used is in its ``summary.json`` (``slot``).

The GPUs are the machine's: submitit's local executor sets every job's
``CUDA_VISIBLE_DEVICES`` (to nothing unless ``hydra.launcher.gpus_per_node`` is set), so an
empty value there says nothing of the machine and the GPUs are counted through NVML, which,
unlike CUDA, reads no ``CUDA_VISIBLE_DEVICES`` it would then be bound by. Slots are per
sweep folder: two sweeps at once on one machine do not see each other's.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from caitlab.console import say
from caitlab.cpus import affinity_cores

log = logging.getLogger("caitlab")

POLL_S = 1.0  # how often a waiting job tries the slots again
_held: dict[str, Any] = {}  # this process's slot and its lock's descriptor, kept open


@dataclass(frozen=True)
class Slot:
    """A part of the machine one run has to itself."""

    index: int
    gpus: tuple[str, ...]  # as CUDA_VISIBLE_DEVICES names them; () on a CPU slot
    cores: tuple[int, ...]


def layout(gpus: Sequence[str], cores: Sequence[int], devices: int | None,
           cpus_per_task: int | None) -> list[Slot]:
    """The machine's slots: ``devices`` GPUs each where ``devices`` is given (a GPU run) and
    there are GPUs, an even share of ``cores`` with them; otherwise ``cpus_per_task`` cores
    each (1 when unset). Too few GPUs or cores for one slot: one slot with all of them (the
    trainer's own check then says what is missing); more slots than cores: they share."""
    if devices is not None and gpus:
        n = max(1, len(gpus) // max(1, devices))
        groups = [tuple(gpus[i * devices:(i + 1) * devices]) if len(gpus) >= devices
                  else tuple(gpus) for i in range(n)]
        each = max(1, len(cores) // n)
    else:
        each = max(1, cpus_per_task or 1)
        n = max(1, len(cores) // each)
        groups = [()] * n
    return [Slot(i, groups[i], _share(cores, i, each, n)) for i in range(n)]


def _share(cores: Sequence[int], i: int, each: int, n: int) -> tuple[int, ...]:
    """Slot ``i``'s cores: ``each`` of them (all there are, when fewer), disjoint from the
    other slots' while there are as many cores as slots."""
    if len(cores) < n:  # fewer cores than slots: one each, shared round the slots
        return (cores[i % len(cores)],)
    return tuple(cores[i * each:(i + 1) * each])


def nvml_gpu_count() -> int:
    """The machine's NVIDIA GPUs as the driver's NVML counts them (0 without a driver).
    Unlike CUDA's count, it starts no CUDA context, which would fix this process's
    ``CUDA_VISIBLE_DEVICES`` before the slot's is set."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return 0
    if nvml.nvmlInit_v2() != 0:
        return 0
    try:
        count = ctypes.c_uint(0)
        return count.value if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0 else 0
    finally:
        nvml.nvmlShutdown()


def machine_gpus() -> list[str]:
    """The GPUs slots are cut from: ``CUDA_VISIBLE_DEVICES`` where it names some (submitit's
    ``gpus_per_node``), else every GPU of the machine."""
    visible = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if g.strip()]
    return visible or [str(i) for i in range(nvml_gpu_count())]


def local_gpu_request(gpus_per_node: int | None, visible: str | None,
                      machine: int) -> dict[str, Any]:
    """What a local sweep with slots asks submitit's local executor for, for GPU runs: every
    GPU the launcher sees, so that each job cuts its own slot from all of them. Asked for
    ``trainer.devices`` GPUs, the executor would show every job the same first ones, and
    the sweep would have one slot.

    Parameters:
        gpus_per_node: what the launcher asks for without slots (None or 0: CPU runs).
        visible: the launcher's ``CUDA_VISIBLE_DEVICES`` (None or empty: unset).
        machine: the machine's GPU count (:func:`nvml_gpu_count`).

    Returns:
        The executor parameters to override: ``gpus_per_node`` and, where the launcher was
        given GPU indices, ``visible_gpus`` (the executor takes indices only); {} for CPU runs.
    """
    if not gpus_per_node:
        return {}
    names = [g.strip() for g in (visible or "").split(",") if g.strip()]
    if not names:
        return {"gpus_per_node": machine} if machine else {}
    if all(n.isdigit() for n in names):
        return {"gpus_per_node": len(names), "visible_gpus": [int(n) for n in names]}
    return {"gpus_per_node": len(names)}


def gpu_devices(trainer: DictConfig | dict, gpus: Sequence[str]) -> int | None:
    """GPUs per run when the trainer trains on GPUs here (None: a CPU run)."""
    accelerator = str(trainer.get("accelerator", "cpu"))
    if accelerator not in ("gpu", "cuda") and not (accelerator == "auto" and gpus):
        return None
    devices = trainer.get("devices", 1)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        return devices
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return len(devices)
    return max(1, len(gpus))  # auto, -1: Lightning takes them all, one slot


def enabled(cfg: DictConfig) -> bool:
    """Slots are for the jobs of a local sweep (a process each) that ask for them."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "local" and \
        bool(OmegaConf.select(cfg, "cluster.slots", default=False))


def _cpus_per_task(cfg: DictConfig) -> int | None:
    """The launcher's ``cpus_per_task`` (``cluster.cpus_per_task`` unless overridden)."""
    if HydraConfig.initialized():
        hydra: Any = HydraConfig.get()  # a DictConfig, though typed as the dataclass it follows
        launcher = hydra.get("launcher") or {}
        if "cpus_per_task" in launcher:
            return launcher.get("cpus_per_task")
    return OmegaConf.select(cfg, "cluster.cpus_per_task", default=None)


def claim(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """Waits for a free slot of the sweep in ``run_dir``'s parent, takes it and keeps this
    process to it; what the summary records of it (None where slots are not asked for)."""
    if not enabled(cfg):
        return None
    if "slot" in _held:
        return _held["slot"]
    gpus = machine_gpus()
    slots = layout(gpus, affinity_cores(), gpu_devices(cfg.trainer, gpus), _cpus_per_task(cfg))
    t0 = time.time()
    slot, fd = acquire(run_dir.parent / ".slots", slots)
    pin(slot)
    _held.update(fd=fd, slot={"index": slot.index, "of": len(slots), "gpus": list(slot.gpus),
                              "cores": list(slot.cores), "waited_s": round(time.time() - t0, 1)})
    return _held["slot"]


def acquire(folder: Path, slots: list[Slot], poll_s: float | None = None) -> tuple[Slot, int]:
    """The first free slot (its lock taken) and the lock's descriptor, waiting for one while
    all are taken; says once that it waits."""
    folder.mkdir(parents=True, exist_ok=True)
    said = False
    while True:
        for slot in slots:
            fd = os.open(folder / f"{slot.index}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return slot, fd
        if not said:
            say(log, f"waiting for a free slot ({len(slots)} busy)")
            said = True
        time.sleep(POLL_S if poll_s is None else poll_s)


def pin(slot: Slot) -> None:
    """Keeps this process (and what it starts) to the slot's GPUs and cores."""
    if slot.gpus:
        import torch  # heavy: the launcher imports this module, a job pins before CUDA starts

        if torch.cuda.is_initialized():  # too late: CUDA has read CUDA_VISIBLE_DEVICES
            raise RuntimeError("caitlab.slots: CUDA started before the run's slot "
                               "was claimed; claim it first")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(slot.gpus)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, slot.cores)
