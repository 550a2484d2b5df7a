"""Submitting a plan's jobs: submitit's executor with the launcher's parameters, one job
array per group of jobs waiting for the same upstream jobs, each running the code as
submitted (``caitlab.sweeps.snapshot``) from one shared pickle of the launcher.

Before anything is submitted to SLURM, a partition the cluster does not have, no partition
where the cluster has no default one, or a request no node of the partition can take is
refused (sbatch would reject every job of the array, or leave it queued for ever).
"""

import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from hydra.core.singleton import Singleton
from hydra.core.utils import filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as hsl
from omegaconf import OmegaConf

from caitlab import slots
from caitlab.config import ConfigError
from caitlab.sweeps import slurm, snapshot
from hydra_plugins.caitlab_launcher import task
from hydra_plugins.caitlab_launcher.plan import Entry, Plan

log = logging.getLogger(__name__)


@dataclass
class Submission:
    """A plan acted on: the jobs submitted for its entries, and the code snapshots they run.

    Args:
        plan: the batch's plan.
        jobs: (entry, its submitit job) for each entry submitted, in submission order.
        codes: the code snapshots of the arrays (None where there is no checkout).
    """

    plan: Plan
    jobs: list[tuple[Entry, Any]] = field(default_factory=list)
    codes: list[Path | None] = field(default_factory=list)


def check_partition(params: dict[str, Any]) -> None:
    """A job array is refused as a whole by sbatch when its partition is unknown, or unset
    on a cluster without a default partition, and sits in the queue for ever when no node of
    the partition has the CPUs, memory or GPUs a job asks: say so before submitting, naming
    the key (and what the partition offers).

    Args:
        params: the launcher's parameters (``hydra.launcher``).

    Raises:
        ConfigError: naming the key to change; nothing where ``sinfo`` cannot say.
    """
    extra = params.get("additional_parameters") or {}
    partition = params.get("partition") or extra.get("partition") or \
        os.environ.get("SBATCH_PARTITION")  # sbatch's own default, when set
    found = slurm.slurm_partitions()
    if found is None:
        return
    names, default = found
    if partition is None:
        if default is None:
            raise ConfigError(f"cluster.partition=null is not allowed: this SLURM cluster has "
                              f"no default partition; set one of {', '.join(names)}")
        partition = default
    unknown = [p for p in str(partition).split(",") if p.strip() not in names]
    if unknown:
        raise ConfigError(f"cluster.partition={partition!r} is not allowed: this SLURM cluster "
                          f"has no partition {', '.join(unknown)}; use one of {', '.join(names)}")
    refusal = slurm.request_refusal(params, str(partition))
    if refusal:
        raise ConfigError(refusal)


def executor(launcher: Any, after: tuple[str, ...] = ()) -> tuple[Any, str]:
    """submitit's executor with the launcher's parameters, as hydra-submitit-launcher's
    ``launch`` builds it, after checking the partition where that is SLURM's.

    Args:
        launcher: the caitlab launcher (its ``params``, ``cluster`` and ``config``).
        after: the jobs the array waits for (``--dependency=afterok:...``).

    Returns:
        (the executor, its folder).
    """
    import submitit  # 30 ms, only where a sweep submits: every caitlab-train imports this

    params = dict(launcher.params)
    cluster = launcher.cluster
    if after:
        extra = params.get("additional_parameters") or {}
        extra = cast("dict[str, Any]", OmegaConf.to_container(extra)) \
            if OmegaConf.is_config(extra) else dict(extra)
        params["additional_parameters"] = {**extra,
                                           "dependency": "afterok:" + ":".join(after)}
    if cluster == "slurm":
        check_partition(params)
        # a DDP task that fails ends its job's step at once, instead of leaving the other
        # ranks in a collective until the process group's timeout (caitlab.training.ranks)
        params.setdefault("srun_args", ["--kill-on-bad-exit=1"])
    if cluster == "local" and OmegaConf.select(launcher.config, "cluster.slots", default=False):
        params.update(slots.local_gpu_request(params.get("gpus_per_node"),
                                              os.environ.get("CUDA_VISIBLE_DEVICES"),
                                              slots.nvml_gpu_count()))
    init_params = {"folder": params.pop("submitit_folder")}
    if "max_num_timeout" in params:
        init_params[f"{cluster}_max_num_timeout"] = params.pop("max_num_timeout")
    found = submitit.AutoExecutor(cluster=cluster, **init_params)
    base = set(OmegaConf.structured(hsl.BaseQueueConf).keys())
    found.update_parameters(**{k if k in base else f"{cluster}_{k}": v
                               for k, v in params.items()})
    return found, init_params["folder"]


def submit(launcher: Any, plan: Plan, sweep_dir: Path, initial_job_idx: int) -> Submission:
    """Submits the plan's jobs to run or resume: an array per group of jobs that wait for
    the same upstream jobs (``Plan.arrays``).

    Args:
        launcher: the caitlab launcher; its tasks run a pickle of it.
        plan: the batch's plan.
        sweep_dir: the sweep folder (``hydra.sweep.dir``).
        initial_job_idx: Hydra's number of the batch's first job.

    Returns:
        The :class:`Submission`, its jobs in submission order.
    """
    done = Submission(plan)
    for after, group in plan.arrays():
        jobs, code = _array(launcher, sweep_dir, group, initial_job_idx, after)
        done.jobs += list(zip(group, jobs, strict=True))
        done.codes.append(code)
    return done


def _array(launcher: Any, sweep_dir: Path, entries: tuple[Entry, ...], initial_job_idx: int,
           after: tuple[str, ...]) -> tuple[list[Any], Path | None]:
    """(the jobs of ``entries``' array, submitted, starting once the jobs ``after`` have
    completed; the code snapshot they run)."""
    found, folder = executor(launcher, after)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in launcher.config.hydra.sweep:  # as upstream: the sweep folder's permissions
        os.chmod(sweep_dir, mode=int(str(launcher.config.hydra.sweep.mode), 8))
    # the code the jobs import, whenever they start: see caitlab.sweeps.snapshot
    code = snapshot.take(sweep_dir / ".submitit", [e.run_dir for e in entries]) \
        if launcher.snapshot else None
    if code is not None:
        log.info(f"jobs run the code as submitted, copied to {code}")
    try:
        with snapshot.on_path(code):
            return _map_array(launcher, found, folder, entries, initial_job_idx), code
    except BaseException:
        snapshot.remove(code)
        raise


def _map_array(launcher: Any, found: Any, folder: str, entries: tuple[Entry, ...],
               initial_job_idx: int) -> list[Any]:
    """Submits ``entries`` as one job array; its jobs, in order."""
    import cloudpickle  # with submitit: only where a sweep submits
    from submitit.core.utils import JobPaths  # with submitit, as above

    job_params = []
    for entry in entries:
        idx = initial_job_idx + entry.index
        log.info(f"\t#{idx} : {' '.join(filter_overrides(list(entry.overrides)))}")
        # the folder decided here: a job that starts later, or is requeued, does not
        # decide again with whatever code and run folders it then finds
        job_params.append(([*entry.overrides, f"hydra.sweep.subdir={entry.run_dir.name}"],
                           "hydra.sweep.dir", idx, f"job_id_for_{idx}"))
    # submitit pickles the callable and its arguments once per task: this launcher and
    # Hydra's state are 60 kB and tens of ms each, the same for every task. They are
    # pickled once, next to the tasks' own pickles, and each task gets a reference.
    shared = (JobPaths.get_first_id_independent_folder(folder)
              / f"launcher-{uuid.uuid4().hex}.pkl")
    shared.parent.mkdir(parents=True, exist_ok=True)
    with open(shared, "wb") as f:
        cloudpickle.dump((launcher, Singleton.get_state()), f)
    # through the module: Hydra's plugin scan executes it again, and the class a task
    # pickles must be the one the module now holds
    return found.map_array(task.ArrayTask(str(shared)), *zip(*job_params, strict=True))
