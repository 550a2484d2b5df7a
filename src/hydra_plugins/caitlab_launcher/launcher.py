"""Hydra launchers for sweeps on SLURM (and submitit's local executor), sweep-aware.

hydra-submitit-launcher 1.2.0 does the submission (one job array, submitit's requeue on
preemption/time-out through ``checkpoint``). On top of it, as Hydra's maintainers suggest for
custom logic, these subclasses:

- resolve each job's run folder (its config signature) before submitting, and submit only
  the runs that are not completed; failed or diverged runs only with ``retry_failed=true``;
- write ``summary.json`` with ``status: pending`` and the SLURM job id for every submitted
  run, so ``caitlab-sweep status`` sees the whole sweep at once;
- with ``wait: false``, return once the array is submitted instead of waiting for it;
- refuse, before submitting anything, a partition the cluster does not have, or no partition
  where the cluster has no default one (sbatch would reject every job of the array).

Submitting stays cheap for large sweeps (scripts/bench_sweep.py: 256 runs in 3 s, where it
took over 2 minutes): ``SweepAwareSweeper`` (conf/hydra/default.yaml) and the launchers share
a ``SweepPlan``, which composes the config once per set of config-group choices instead of
twice per job, and the array's tasks share one pickle of the launcher.
"""

import copy
import logging
import os
import pickle
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import config as hsl_config
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as hsl
from omegaconf import DictConfig, OmegaConf

from caitlab import compat, identity
from caitlab.config import ConfigError
from caitlab.runs import (
    RunFailed,
    Summary,
    read_summary,
    skip_reason,
)
from caitlab.status import LIVE, SUBMITTED_OVER, Status
from caitlab.sweeps import slots, slurm

log = logging.getLogger(__name__)


def _skipped(overrides: list[str], summary: dict[str, Any],
             failed: str | None = None) -> JobReturn:
    """A job not run here; ``failed``: why it counts as failed (Hydra's sweeper raises it once
    the batch is done, so that the sweep's exit status says so: caitlab.train.main)."""
    ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
    ret.return_value = summary.get("test/top1")
    if failed is not None:
        ret.status, ret.return_value = JobStatus.FAILED, RunFailed(failed)
    return ret


class _Base:
    """One composition of a sweep, shared by its jobs that choose the same config groups."""

    def __init__(self, config: DictConfig) -> None:
        self.pristine = config
        self.work: DictConfig | None = None  # ``pristine`` + the last job's value overrides
        self.applied: list[Any] | None = None  # the last job's value overrides


class SweepPlan:
    """Each job of a sweep as Hydra composes it, and its run folder, at a fraction of the cost.

    Hydra composes every job from scratch (``load_sweep_config``: 0.2-0.5 s on a laptop CPU),
    twice per job in a sweep (the sweeper validates every job, then the launcher needs its
    run folder): minutes for a sweep of hundreds of runs. But composing only interprets the
    config-group overrides (``model=vit_tiny``); Hydra applies the other, value overrides
    (``seed=3``) to the composed config afterwards, one by one, with
    ``caitlab.compat.apply_value_overrides``. So the plan composes once per distinct set
    of group overrides (sorted out by Hydra's own rule, ``defaults_list.Overrides``) and applies
    each job's value overrides to it with that same function: the job's config, and any error,
    are Hydra's own. Jobs that only change existing keys to plain values (a seed sweep, a grid
    over ``model.depth``...) are applied in place, one after the other, to one copy of the
    composition: each job sets the same keys, so nothing of the previous job survives; any
    other job starts from a fresh copy.

    Only the ``hydra`` node differs from a full composition (its record of the value
    overrides), so a ``hydra.sweep.dir`` that interpolates ``hydra.*`` falls back to composing
    every job in full.
    """

    def __init__(self, config_loader: Any, master: DictConfig) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self._loader = config_loader
        self._master = master
        self._parser = OverridesParser.create()  # building a parser costs more than parsing
        self._repo = getattr(config_loader, "repository", None)
        self._bases: dict[tuple[str, ...], _Base] = {}
        self._parsed: dict[str, tuple[Any, bool]] = {}
        self._run_dirs: dict[tuple[str, ...], Path] = {}
        self._identity: identity.Identity | None = None
        self._listed: dict[Path, bool] = {}  # sweep folder: holds anything yet
        raw_dir = OmegaConf.to_container(master.hydra.sweep, resolve=False).get("dir")
        self._full = self._repo is None or "hydra" in str(raw_dir)

    def _parse(self, line: str) -> tuple[Any, bool]:
        """(the parsed override, whether composition needs it); a sweep repeats most of its
        overrides in every job, so each distinct one is parsed and classified once."""
        if line not in self._parsed:
            (o,) = self._parser.parse_overrides([line])
            self._parsed[line] = (o, identity.composes(o, self._repo.group_exists))
        return self._parsed[line]

    def _split(self, overrides: list[str]) -> tuple[tuple[str, ...], list[Any]]:
        """(the overrides composition needs, the value overrides applied afterwards)."""
        group, values = [], []
        for line in overrides:
            o, composes = self._parse(line)
            if composes:
                group.append(line)
            else:
                values.append(o)
        return tuple(group), values

    def _job(self, overrides: list[str]) -> tuple[DictConfig, _Base | None]:
        if self._full:
            return self._loader.load_sweep_config(self._master, list(overrides)), None
        group, values = self._split(overrides)
        base = self._base(group)
        changed = _changes(base.applied, values)
        if changed is None:
            work, changed = copy.deepcopy(base.pristine), values
        else:
            work = base.work
        base.work = base.applied = None  # until the overrides are all applied
        compat.apply_value_overrides(changed, work)
        base.work, base.applied = work, values
        return work, base

    def _base(self, group: tuple[str, ...]) -> _Base:
        if group not in self._bases:
            self._bases[group] = _Base(self._loader.load_sweep_config(self._master, list(group)))
        return self._bases[group]

    def config(self, overrides: list[str]) -> DictConfig:
        """The job's config (its non-``hydra`` part exactly Hydra's); raises what Hydra raises.
        It is the plan's working copy: read it before asking for the next job's."""
        return self._job(overrides)[0]

    def run_dir(self, overrides: list[str]) -> Path:
        """``<hydra.sweep.dir>/<signature>``: where the job will run (``caitlab.identity``),
        the signature computed from the plan's compositions of the same group overrides."""
        key = tuple(overrides)
        if key not in self._run_dirs:
            if self._identity is None:
                self._identity = identity.Identity(
                    lambda group: self._base(group).pristine, self._repo.group_exists)
            cfg, _ = self._job(list(overrides))
            sig = identity.signature_of(self._identity.delta(cfg, overrides))
            parent = Path(str(cfg.hydra.sweep.dir))
            if parent not in self._listed:
                self._listed[parent] = parent.is_dir() and any(parent.iterdir())
            name = identity.folder(parent, sig, cfg) if self._listed[parent] else sig
            self._run_dirs[key] = parent / name
        return self._run_dirs[key]


def _changes(previous: list[Any] | None, values: list[Any]) -> list[Any] | None:
    """The overrides that turn the config of a job with value overrides ``previous`` into that
    of one with ``values``, applied to it in place; None where only a fresh copy is exact.

    In place is exact when both jobs have overrides in the same places with distinct keys, none
    a prefix of another (so their order does not matter), and each that differs sets an
    existing key to a plain value (so it replaces whatever the previous job left there)."""
    from hydra.core.override_parser.types import OverrideType

    if previous is None or len(previous) != len(values):
        return None
    keys = [o.key_or_group for o in values]
    if len(set(keys)) != len(keys) or any(a.startswith(f"{b}.") for a in keys for b in keys):
        return None
    changed = []
    for old, new in zip(previous, values, strict=True):
        if old.input_line == new.input_line:
            continue
        if old.key_or_group != new.key_or_group or any(
                o.type != OverrideType.CHANGE or isinstance(o.value(), (dict, list))
                for o in (old, new)):
            return None
        changed.append(new)
    return changed


def check_partition(params: dict[str, Any]) -> None:
    """A job array is refused as a whole by sbatch when its partition is unknown, or unset
    on a cluster without a default partition, and sits in the queue for ever when no node of
    the partition has the CPUs, memory or GPUs a job asks: say so before submitting, naming
    the key (and what the partition offers)."""
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


class _SweepAwareMixin:
    """Launch only what a sweep still needs (see the module doc)."""

    cluster: str  # submitit's executor: "slurm" or "local"

    def __init__(self, wait: bool = True, snapshot: bool = True, cancel_removed: bool = False,
                 **params: Any) -> None:
        super().__init__(**params)
        self.wait = wait
        self.snapshot = snapshot
        self.cancel_removed = cancel_removed  # runs no longer in the sweep: cancel their jobs
        self._sweep_plan: SweepPlan | None = None
        self._squeue: slurm.Queue | None = None  # squeue's answer, once per launch
        # batches submitted with hold: (jobs, their runs, their code snapshots)
        self._held: list[tuple[list[Any], list[tuple[int, list[str], Path]], list[Any]]] = []
        self._after: dict[Path, tuple[str, ...]] = {}  # run folder: upstream jobs it waits for

    @property
    def sweep_plan(self) -> "SweepPlan":
        """The sweep's jobs and run folders; shared with ``SweepAwareSweeper``'s validation."""
        if self._sweep_plan is None:
            self._sweep_plan = SweepPlan(self.hydra_context.config_loader, self.config)
        return self._sweep_plan

    def __getstate__(self) -> dict[str, Any]:
        # what a job unpickles: the plan's compositions are only needed here, at submission
        return {**self.__dict__, "_sweep_plan": None, "_squeue": None, "_held": [],
                "_after": {}}

    def _plan(self, job_overrides) -> tuple[list[tuple[int, list[str], Path]], list[JobReturn]]:
        todo, skipped = [], []
        retry = bool(self.config.get("retry_failed", False))
        self._after = {}
        for idx, overrides in enumerate(job_overrides):
            overrides = list(overrides)
            run_dir = self.sweep_plan.run_dir(overrides)
            previous = read_summary(run_dir) or {}
            reason = skip_reason(previous, retry)
            if reason != Status.COMPLETED and (found := self._upstream(overrides, run_dir)):
                blocked, upstream = found
                log.warning(f"\tskipping {' '.join(overrides)}: {blocked}")
                Summary(run_dir, self._facts(overrides, run_dir)).update(
                    status=Status.BLOCKED, error=blocked, blocked_by=upstream, slurm_job_id=None)
                skipped.append(_skipped(overrides, previous, failed=blocked))
                continue
            if reason == Status.COMPLETED:
                log.info(f"\tskipping {' '.join(overrides)}: {reason} ({run_dir})")
                skipped.append(_skipped(overrides, previous))
            elif reason is not None:
                from caitlab.training.lifecycle import skipped_message

                line = skipped_message(previous, run_dir)
                log.warning(f"\tskipping {' '.join(overrides)}: {line}")
                skipped.append(_skipped(overrides, previous, failed=line))
            elif (job := self._live_job(previous)) is not None:
                log.info(f"\tskipping {' '.join(overrides)}: its job {job} is still queued "
                         "or running")
                skipped.append(_skipped(overrides, previous))
            else:
                todo.append((idx, overrides, run_dir))
        return todo, skipped

    def _facts(self, overrides: list[str], run_dir: Path) -> dict[str, Any]:
        """What ``caitlab-sweep status`` shows of a run not started yet."""
        from caitlab.stages import stage_facts

        stage = next((o.split("=", 1)[1] for o in overrides if o.startswith("stage=")), None)
        return {"overrides": overrides, "signature": run_dir.name,
                "name": self.config.get("name"),
                **stage_facts(stage, self.config.get("stages") or {})}

    def _upstream(self, overrides: list[str], run_dir: Path) -> tuple[str, str] | None:
        """(why, the upstream's folder) where a stage's job cannot be submitted (its upstream
        ended without completing), or None; an upstream still queued or running becomes the
        job's SLURM dependency (``self._after``: run folder -> the upstream jobs it waits for)."""
        from caitlab import stages

        waits = []
        for ref in stages.references(overrides):
            up = read_summary(run_dir.parent / ref.signature)
            if up is not None and up.get("status") != Status.COMPLETED \
                    and (job := self._live_job(up)) is not None:
                waits.append(job)
                continue
            reason = stages.blocked_reason(ref, up)
            if reason is not None:
                return reason, ref.signature
        if waits:
            self._after[run_dir] = tuple(sorted(waits))
        return None

    def _live_job(self, previous: dict[str, Any]) -> str | None:
        """The run's SLURM job where it is still queued or running: a re-launch must not
        submit a second job for the same folder."""
        if previous.get("status") not in LIVE:
            return None
        queue = self._queue()
        return None if queue is None else slurm.live_job(previous, queue)

    def launch(self, job_overrides, initial_job_idx: int, *, hold: bool = False,
               whole: Any = None):
        """hydra-submitit-launcher's ``launch`` for the runs the sweep still needs, as one
        job array running the code as submitted (caitlab.sweeps.snapshot); each run's
        ``summary.json`` says ``pending`` until its job starts. A stage whose upstream is
        still queued or running is its own array, submitted with ``afterok`` on it.

        ``hold``: submit without waiting; :meth:`wait_held` waits for every held batch (a
        chain of stages on SLURM). ``whole``: every job of the sweep, where this batch is
        one stage of it (the runs no longer in the sweep are those outside ``whole``)."""
        from caitlab.sweeps import snapshot

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        if not hold or not self._held:
            snapshot.clean(sweep_dir)  # those of finished sweeps
        self._squeue = None  # a batch sees the queue as it is now, not as an earlier batch did
        todo, skipped = self._plan(job_overrides)
        self._removed(sweep_dir, job_overrides if whole is None else whole)
        log.info(f"caitlab sweep: {len(todo)} to run, {len(skipped)} already done "
                 f"({sweep_dir})")
        if not todo:
            return skipped
        jobs, codes = [], []
        for after, group in _by_dependency(todo, self._after):
            group_jobs, code = self._submit_array(sweep_dir, group, initial_job_idx, after)
            jobs, codes = jobs + group_jobs, codes + [code]
        todo = [t for _, group in _by_dependency(todo, self._after) for t in group]
        for job, (_, overrides, run_dir) in zip(jobs, todo, strict=True):
            summary = Summary(run_dir, self._facts(overrides, run_dir))
            if summary.get("status") in SUBMITTED_OVER:
                summary.update(status=Status.PENDING, slurm_job_id=str(job.job_id))
        arrays = sorted({j.job_id.split('_')[0] for j in jobs})
        log.info(f"submitted {len(jobs)} runs as job array{'s' * (len(arrays) > 1)} "
                 f"{', '.join(arrays)}")
        if hold:
            self._held.append((jobs, todo, codes))
            return skipped
        if not self.wait:
            log.info("not waiting (hydra.launcher.wait=false): follow it with "
                     f"caitlab-sweep status {sweep_dir}")
            return skipped + [_skipped(o, {}) for _, o, _ in todo]
        return skipped + self._wait(jobs, todo, codes, sweep_dir)

    def wait_held(self) -> list[JobReturn]:
        """Waits for the batches submitted with ``hold`` (where ``wait`` is true), returns
        their jobs' results."""
        held, self._held = self._held, []
        jobs = [j for js, _, _ in held for j in js]
        todo = [t for _, ts, _ in held for t in ts]
        if not jobs:
            return []
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        if not self.wait:
            log.info("not waiting (hydra.launcher.wait=false): follow it with "
                     f"caitlab-sweep status {sweep_dir}")
            return [_skipped(o, {}) for _, o, _ in todo]
        return self._wait(jobs, todo, [c for *_, cs in held for c in cs], sweep_dir)

    def _wait(self, jobs: list[Any], todo: list[tuple[int, list[str], Path]],
              codes: list[Path | None], sweep_dir: Path) -> list[JobReturn]:
        from caitlab.sweeps import snapshot

        run_dirs = [run_dir for *_, run_dir in todo]
        blocked = follow(jobs, run_dirs, sweep_dir) if self.cluster == "slurm" else {}
        returns = [_skipped(overrides, read_summary(run_dir) or {}, failed=blocked[job.job_id])
                   if job.job_id in blocked else _result(job, overrides, run_dir)
                   for job, (_, overrides, run_dir) in zip(jobs, todo, strict=True)]
        for code in codes:
            snapshot.remove(code)  # every job has ended: no requeue can need it
        return returns

    def _submit_array(self, sweep_dir: Path, todo: list[tuple[int, list[str], Path]],
                      initial_job_idx: int, after: tuple[str, ...] = ()
                      ) -> tuple[list[Any], Path | None]:
        """(the jobs of ``todo``'s array, submitted, starting once the jobs ``after`` have
        completed; the code snapshot they run)."""
        from caitlab.sweeps import snapshot

        executor, folder = self._executor(after)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:  # as upstream: the sweep folder's permissions
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        # the code the jobs import, whenever they start: see caitlab.sweeps.snapshot
        code = snapshot.take(sweep_dir / ".submitit", [d for *_, d in todo]) \
            if self.snapshot else None
        if code is not None:
            log.info(f"jobs run the code as submitted, copied to {code}")
        try:
            with snapshot.on_path(code):
                return self._submit(executor, folder, todo, initial_job_idx), code
        except BaseException:
            snapshot.remove(code)
            raise

    def _queue(self) -> "slurm.Queue | None":
        """squeue's answer, asked once per launch; None off SLURM or when it cannot say."""
        if self.cluster != "slurm":
            return None
        if self._squeue is None:
            try:
                self._squeue = slurm.query_queue(30)
            except slurm.SqueueUnavailable as err:
                log.warning(f"squeue unavailable ({err}): jobs still queued are not seen")
                self._squeue = slurm.Queue()
        return self._squeue

    def _removed(self, sweep_dir: Path, job_overrides) -> None:
        """Lists the runs of the sweep folder no longer in the sweep; with
        ``cancel_removed=true``, cancels their live jobs (as Dora's grids do). Only where the
        sweep is one batch: with ``max_batch_size`` a batch is not the whole grid."""
        if OmegaConf.select(self.config, "hydra.sweeper.max_batch_size") or \
                not sweep_dir.is_dir():
            return
        wanted = {self.sweep_plan.run_dir(list(o)).name for o in job_overrides}
        removed = [(p.parent, s) for p in sorted(sweep_dir.glob("*/summary.json"))
                   if p.parent.name not in wanted and (s := read_summary(p.parent))]
        if not removed:
            return
        log.warning(f"{len(removed)} runs of {sweep_dir} are no longer in the sweep:")
        for folder, s in removed:
            log.warning(f"\t{folder.name} ({s.get('status')}): "
                        f"{' '.join(map(str, s.get('overrides') or []))}")
        queue = self._queue()
        if not self.cancel_removed or queue is None:
            log.warning("\thydra.launcher.cancel_removed=true cancels their SLURM jobs")
            return
        for folder, job in slurm.cancel_runs(removed, queue):
            log.warning(f"\tcancelled {folder.name} (job {job}): no longer in the sweep")

    def _executor(self, after: tuple[str, ...] = ()) -> tuple[Any, str]:
        """(submitit's executor with the launcher's parameters, as upstream's ``launch`` builds
        it; its folder), after checking the partition where that is SLURM's. ``after``: the
        jobs the array waits for (``--dependency=afterok:...``)."""
        import submitit

        params = dict(self.params)
        if after:
            extra = params.get("additional_parameters") or {}
            extra = OmegaConf.to_container(extra) if OmegaConf.is_config(extra) else dict(extra)
            params["additional_parameters"] = {**extra,
                                               "dependency": "afterok:" + ":".join(after)}
        if self.cluster == "slurm":
            check_partition(params)
            # a DDP task that fails ends its job's step at once, instead of leaving the other
            # ranks in a collective until the process group's timeout (caitlab.training.ranks)
            params.setdefault("srun_args", ["--kill-on-bad-exit=1"])
        if self.cluster == "local" and OmegaConf.select(self.config, "cluster.slots",
                                                        default=False):
            params.update(slots.local_gpu_request(params.get("gpus_per_node"),
                                                  os.environ.get("CUDA_VISIBLE_DEVICES"),
                                                  slots.nvml_gpu_count()))
        init_params = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init_params[f"{self.cluster}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self.cluster, **init_params)
        base = set(OmegaConf.structured(hsl.BaseQueueConf).keys())
        executor.update_parameters(**{
            k if k in base else f"{self.cluster}_{k}": v for k, v in params.items()
        })
        return executor, init_params["folder"]

    def _submit(self, executor: Any, folder: str, todo: list[tuple[int, list[str], Path]],
                initial_job_idx: int) -> list[Any]:
        """Submits ``todo`` as one job array; its jobs, in order."""
        import cloudpickle
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides
        from submitit.core.utils import JobPaths

        job_params = []
        for idx, overrides, run_dir in todo:
            log.info(f"\t#{initial_job_idx + idx} : {' '.join(filter_overrides(overrides))}")
            # the folder decided here: a job that starts later, or is requeued, does not
            # decide again with whatever code and run folders it then finds
            job_params.append(([*overrides, f"hydra.sweep.subdir={run_dir.name}"],
                               "hydra.sweep.dir", initial_job_idx + idx,
                               f"job_id_for_{initial_job_idx + idx}"))
        # submitit pickles the callable and its arguments once per task: this launcher and
        # Hydra's state are 60 kB and tens of ms each, the same for every task. They are
        # pickled once, next to the tasks' own pickles, and each task gets a reference.
        shared = (JobPaths.get_first_id_independent_folder(folder)
                  / f"launcher-{uuid.uuid4().hex}.pkl")
        shared.parent.mkdir(parents=True, exist_ok=True)
        with open(shared, "wb") as f:
            cloudpickle.dump((self, Singleton.get_state()), f)
        return executor.map_array(ArrayTask(str(shared)), *zip(*job_params, strict=True))


def _by_dependency(todo: list[tuple[int, list[str], Path]],
                   after: dict[Path, tuple[str, ...]]
                   ) -> list[tuple[tuple[str, ...], list[tuple[int, list[str], Path]]]]:
    """``todo`` in groups that wait for the same upstream jobs (an array each), in order."""
    groups: dict[tuple[str, ...], list[tuple[int, list[str], Path]]] = {}
    for item in todo:
        groups.setdefault(after.get(item[2], ()), []).append(item)
    return list(groups.items())


FOLLOW_POLL_S = 2.0  # how often a waiting launcher asks SLURM why its jobs wait


def follow(jobs: list[Any], run_dirs: list[Path], sweep_dir: Path) -> dict[str, str]:
    """Waits for every job of the array to end, logging a job's pending reason each time it
    changes; raises ConfigError, naming what to change, once every job still queued can never
    start (they stay queued: ``caitlab-sweep cancel`` or a fix of the partition ends it).

    A stage whose upstream failed never starts either (``DependencyNeverSatisfied``): its job
    is cancelled and its run marked ``blocked``. Returns {job id: the line why} of those."""
    import time

    said: dict[str, str | None] = {}
    cut: dict[str, str] = {}  # stages whose upstream failed
    while left := [(job, d) for job, d in zip(jobs, run_dirs, strict=True)
                   if job.job_id not in cut and not job.done()]:
        try:
            queue = slurm.query_queue()
        except slurm.SqueueUnavailable:
            time.sleep(FOLLOW_POLL_S)
            continue
        for job, run_dir in left:
            if slurm.upstream_failed(queue.reason(str(job.job_id))):
                cut[job.job_id] = _block(job, run_dir)
        left = [(job, d) for job, d in left if job.job_id not in cut]
        if not left:
            break
        for job, run_dir in left:
            reason = queue.reason(str(job.job_id))
            if reason != said.get(job.job_id) and (reason or job.job_id in said):
                never = slurm.never_starts(reason)
                log.info(f"job {job.job_id} ({run_dir.name}) "
                         + (f"waits: {reason}" + (f": never starts: {never}" if never else "")
                            if reason else "waits no more"))
            said[job.job_id] = reason
        blocked = [(job, slurm.never_starts(said[job.job_id])) for job, _ in left]
        if all(never for _, never in blocked):
            jobs_text = ", ".join(f"{job.job_id} ({said[job.job_id]})" for job, _ in blocked)
            raise ConfigError(f"every job still queued can never start: {jobs_text}: "
                              f"{blocked[0][1]}; then caitlab-sweep cancel {sweep_dir} and "
                              "launch again")
        time.sleep(FOLLOW_POLL_S)
    return cut


def _block(job: Any, run_dir: Path) -> str:
    """Cancels the job of a stage whose upstream failed, and marks its run ``blocked``."""
    from caitlab import stages

    summary = Summary(run_dir, {})
    refs = stages.references(summary.get("overrides") or [])
    line = (stages.blocked_reason(refs[0], read_summary(run_dir.parent / refs[0].signature))
            if refs else None) or "blocked: the job it waits for failed"
    slurm.cancel([str(job.job_id)])
    summary.update(status=Status.BLOCKED, error=line,
                   **({"blocked_by": refs[0].signature} if refs else {}))
    log.warning(f"job {job.job_id} ({run_dir.name}) {line}")
    return line


def _result(job: Any, overrides: list[str], run_dir: Path) -> JobReturn:
    """The job's own result; a failed one, saying why, where it died without one (a job that
    died hard must not hide the others' results)."""
    import re

    try:
        return job.results()[0]
    except Exception as err:
        # a run that failed: its job raised the run's own line (ArrayTask), in the trace
        failed = re.search(r"^caitlab\.runs\.RunFailed: (.+)$", str(err), re.MULTILINE)
        if failed:
            return _skipped(overrides, read_summary(run_dir) or {}, failed=failed[1])
        line = (f"job {job.job_id} ({run_dir}) ended without a result: "
                f"{str(err).strip().splitlines()[-1] if str(err).strip() else err}")
        line = _rank_failure(run_dir, line)
        log.error(line)
        return _skipped(overrides, read_summary(run_dir) or {}, failed=line)


def _rank_failure(run_dir: Path, line: str) -> str:
    """Where a DDP job ended because one of its tasks failed (srun --kill-on-bad-exit ends the
    others before rank 0 can write anything), the run's summary says so, naming that rank's
    error (``error.rank<k>.log``); ``line`` with the rank's cause in front."""
    from caitlab.training.ranks import first_rank_error

    summary = read_summary(run_dir) or {}
    others = first_rank_error(run_dir)
    if others is None or summary.get("status") not in LIVE:
        return line
    first, by_rank = others
    line = f"{first}; {line}"
    Summary(run_dir, {}).update(status=Status.FAILED, error=line, rank_errors=by_rank)
    return line


class ArrayTask:
    """What each task of a sweep's job array runs: the launcher's ``__call__`` (Hydra's
    ``run_job`` of the task's overrides), with the launcher and Hydra's state read from the one
    pickle the array shares. Checkpointable like the launcher itself: on preemption or
    time-out submitit requeues the task with the same reference and arguments."""

    def __init__(self, shared: str) -> None:
        self.shared = shared

    def _load(self) -> tuple[Any, dict]:
        with open(self.shared, "rb") as f:
            return pickle.load(f)

    def __call__(self, *args: Any) -> JobReturn:
        launcher, singleton_state = self._load()
        ret = launcher(*args, singleton_state)
        if isinstance(ret, JobReturn) and ret.status == JobStatus.FAILED:
            # Hydra keeps a failed task's error in its result, and the job would end with
            # exit status 0: SLURM would count a failed run as done, and start the stages
            # that wait on it (afterok). Raised, the job fails, and its trace has the line:
            # reading a failed job's result raises its error (Hydra's run does the same).
            ret.return_value  # noqa: B018
        return ret

    def checkpoint(self, *args: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args)


class SlurmLauncher(_SweepAwareMixin, hsl.SlurmLauncher):
    cluster = "slurm"  # submitit's name for the executor


class LocalLauncher(_SweepAwareMixin, hsl.LocalLauncher):
    cluster = "local"


class SweepAwareSweeper(compat.BasicSweeper):
    """Hydra's basic sweeper (same ``params``, same batches), whose check that every job
    composes before any is launched goes through a ``SweepPlan``: Hydra's own check composes
    each job in full. With caitlab's launchers the plan is the launcher's, so that each
    composition also serves to find the jobs' run folders."""

    def _plan(self) -> SweepPlan:
        plan = getattr(self.launcher, "sweep_plan", None)  # None: not a caitlab launcher
        if plan is None:
            if getattr(self, "_own_plan", None) is None:
                self._own_plan = SweepPlan(self.hydra_context.config_loader, self.config)
            plan = self._own_plan
        return plan

    def validate_batch_is_legal(self, batch) -> None:
        plan = self._plan()
        for overrides in batch:
            plan.config(list(overrides))

    def sweep(self, arguments: list[str]) -> Any:
        """Hydra's sweep; for an experiment with ``stages`` (caitlab.stages), the chain: each
        stage's jobs after those of the stages it names. caitlab's SLURM launcher submits the
        whole chain at once (a downstream array waits on its upstream job with ``afterok``);
        any other launcher runs one stage after the other."""
        stages = self.config.get("stages")
        if not stages:
            return super().sweep(arguments)
        from caitlab import stages as chain_of

        try:
            chain = chain_of.Chain(OmegaConf.to_container(stages, resolve=False))
        except chain_of.StageError as err:
            raise ConfigError(str(err)) from None
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # as Hydra's sweep does
        batches = chain_batches(chain, [*compat.sweeper_params(self), *arguments],
                                self.hydra_context.config_loader, self._plan())
        whole = [job for _, batch in batches for job in batch]
        held = getattr(self.launcher, "cluster", None) == "slurm"
        returns, idx = [], 0
        for name, batch in batches:
            self.validate_batch_is_legal(batch)
            log.info(f"stage {name}: {len(batch)} run{'s' * (len(batch) != 1)}")
            if isinstance(self.launcher, _SweepAwareMixin):
                results = self.launcher.launch(batch, initial_job_idx=idx, hold=held,
                                               whole=whole)
            else:
                results = self.launcher.launch(batch, initial_job_idx=idx)
            returns.append(results)
            idx += len(batch)
        if held:
            returns.append(self.launcher.wait_held())
        for results in returns:
            for r in results:
                _ = r.return_value  # as Hydra's sweep: a failed job's error, once all ran
        return returns


def chain_batches(chain: Any, arguments: list[str], config_loader: Any,
                  plan: SweepPlan) -> list[tuple[str, list[list[str]]]]:
    """A chain's stages (``caitlab.stages.Chain``) as the sweep runs them: each stage's name
    and its jobs' overrides, the sweep's own ``arguments`` expanded as Hydra's basic sweeper
    expands them, each reference written with its upstream's signature (``plan``'s folder)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from caitlab import stages as chain_of

    parser = OverridesParser.create(config_loader=config_loader)

    def expand(lines: list[str]) -> list[list[str]]:
        return compat.BasicSweeper.split_arguments(parser.parse_overrides(lines), None)[0]

    try:
        return chain.jobs(expand(arguments), expand, lambda job: plan.run_dir(job).name)
    except chain_of.StageError as err:
        raise ConfigError(str(err)) from None


@dataclass
class SweeperConf(compat.BasicSweeperConf):
    _target_: str = "hydra_plugins.caitlab_launcher.launcher.SweepAwareSweeper"


@dataclass
class SlurmConf(hsl_config.SlurmQueueConf):
    _target_: str = "hydra_plugins.caitlab_launcher.launcher.SlurmLauncher"
    wait: bool = True
    snapshot: bool = True
    cancel_removed: bool = False  # re-launch: cancel the live jobs of runs no longer in the grid
    # untyped so they can interpolate `cluster.*` (a typed List/Dict field cannot)
    setup: Any = None
    additional_parameters: Any = None


@dataclass
class LocalConf(hsl_config.LocalQueueConf):
    _target_: str = "hydra_plugins.caitlab_launcher.launcher.LocalLauncher"
    wait: bool = True
    snapshot: bool = True
    cancel_removed: bool = False  # re-launch: cancel the live jobs of runs no longer in the grid


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(group="hydra/launcher", name="caitlab_slurm", node=SlurmConf, provider="caitlab")
    store.store(group="hydra/launcher", name="caitlab_local", node=LocalConf, provider="caitlab")
    store.store(group="hydra/sweeper", name="caitlab_basic", node=SweeperConf,
                provider="caitlab")


register_configs()
