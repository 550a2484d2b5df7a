"""The CPUs a run was given, and the torch threads that follow from them.

Two runs on one machine that each start a thread per core fight over the cores: two vit_tiny
digits runs side by side on 2 cores took 76 s each against 3.9 s alone (torch's OpenMP
threads spin while they wait). A run uses only what it was given: its affinity mask
(``taskset``, a container's cpuset, SLURM's task binding) and at most
``SLURM_CPUS_PER_TASK`` (a SLURM job need not be bound), shared by the DDP ranks that run on
the same machine outside SLURM.
"""

from __future__ import annotations

import os
from typing import Any

from caitlab.config import ConfigError


def affinity_cores() -> list[int]:
    """The cores this process may run on (its affinity mask), in order."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS): every core
        return list(range(os.cpu_count() or 1))


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, at most ``SLURM_CPUS_PER_TASK``."""
    cpus = len(affinity_cores())
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
    return max(1, cpus)


def torch_threads(requested: int | str | None, cpus: int, ranks_here: int = 1) -> int:
    """Intra-op threads for ``requested`` (``auto``/None: this rank's share of ``cpus``; a
    number: as given, the user knows the machine)."""
    if requested in (None, "auto"):
        return max(1, cpus // max(1, ranks_here))
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ConfigError(f"threads={requested!r} is not allowed: must be auto or an "
                          "integer >= 1")
    return requested


def set_torch_threads(cfg: Any) -> int:
    """torch's intra-op threads from the CPUs this run was given, shared by the DDP ranks of
    one machine outside SLURM (``cfg.threads``, ``cfg.trainer``); returns the count."""
    import torch  # heavy: the sweep launcher imports cpus (caitlab.slots)

    devices = cfg.trainer.get("devices", 1)
    local_ranks = devices if (isinstance(devices, int) and cfg.trainer.get("accelerator")
                              == "cpu" and not os.environ.get("SLURM_CPUS_PER_TASK")) else 1
    threads = torch_threads(cfg.get("threads", "auto"), available_cpus(), local_ranks)
    torch.set_num_threads(threads)
    return threads
