"""Hydra launchers for sweeps on SLURM (and submitit's local executor), sweep-aware.

hydra-submitit-launcher 1.2.0 does the submission (one job array, submitit's requeue on
preemption/time-out through ``checkpoint``). On top of it, as Hydra's maintainers suggest for
custom logic, these subclasses launch a batch in three steps:

1. plan (``plan``): each job's run folder (its config signature) and what to do with it:
   run or resume it, skip it (completed; failed or diverged, unless ``retry_failed=true``;
   its job still queued or running) or leave it blocked (a stage whose upstream stage did not
   complete), and the upstream jobs it waits for. Planning writes nothing.
2. act on the plan (``submit``): the summaries of blocked runs, the runs no longer in the
   sweep listed (or cancelled), the runs to run or resume submitted (``submit``), each
   marked ``pending`` with its SLURM job id so ``caitlab-sweep status`` sees the whole
   sweep at once. A partition the cluster does not have, or no partition where the cluster
   has no default one, is refused before anything is submitted.
3. follow the jobs (``follow``) until they end and return their results; with
   ``wait: false``, return once they are submitted.

``SweepAwareSweeper`` (conf/hydra/default.yaml) and the launchers share a ``SweepPlan``
(``compose``), which composes the config once per set of config-group choices instead of
twice per job; a chain of stages is swept by ``chain``; the array's tasks (``task``) share
one pickle of the launcher.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import config as hsl_config
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as hsl
from omegaconf import DictConfig, OmegaConf

from caitlab import compat
from caitlab.record import RunRecord
from caitlab.stages import stage_facts
from caitlab.sweeps import slurm, snapshot

# Modules, not names: Hydra's plugin scan executes each module of this package again, some
# after this one, and what this module uses must be what they hold by then.
from hydra_plugins.caitlab_launcher import chain, compose, follow
from hydra_plugins.caitlab_launcher import plan as planning
from hydra_plugins.caitlab_launcher import submit as submitting

# where the configs, tests and tools name them
from hydra_plugins.caitlab_launcher.chain import chain_batches
from hydra_plugins.caitlab_launcher.compose import SweepPlan
from hydra_plugins.caitlab_launcher.submit import check_partition

__all__ = ["LocalLauncher", "SlurmLauncher", "SweepAwareSweeper", "SweepPlan", "chain_batches",
           "check_partition"]

log = logging.getLogger(__name__)


class _SweepAwareMixin:
    """Launch only what a sweep still needs (see the module doc)."""

    cluster: str  # submitit's executor: "slurm" or "local"
    # set by hydra-submitit-launcher's launcher (``__init__`` and ``setup``)
    params: dict[str, Any]
    config: DictConfig
    hydra_context: Any

    def __init__(self, wait: bool = True, snapshot: bool = True, cancel_removed: bool = False,
                 **params: Any) -> None:
        super().__init__(**params)
        self.wait = wait
        self.snapshot = snapshot
        self.cancel_removed = cancel_removed  # runs no longer in the sweep: cancel their jobs
        self._sweep_plan: compose.SweepPlan | None = None

    @property
    def sweep_plan(self) -> compose.SweepPlan:
        """The sweep's jobs and run folders; shared with ``SweepAwareSweeper``'s validation."""
        if self._sweep_plan is None:
            self._sweep_plan = compose.SweepPlan(self.hydra_context.config_loader, self.config)
        return self._sweep_plan

    def __getstate__(self) -> dict[str, Any]:
        # what a job unpickles: the compositions are only needed here, at submission
        return {**self.__dict__, "_sweep_plan": None}

    def _sweep_dir(self) -> Path:
        return Path(str(self.config.hydra.sweep.dir))

    def plan(self, job_overrides: Any, *, whole: Any = None,
             live_job: planning.LiveJob | None = None) -> planning.Plan:
        """What launching ``job_overrides`` would do; reads the run folders, writes nothing.

        Args:
            job_overrides: the batch's jobs' overrides.
            whole: every job of the sweep, where the batch is one stage of it (the runs no
                longer in the sweep are those outside ``whole``).
            live_job: a run's SLURM job where it is still queued or running
                (``follow.Squeue.live_job``); by default squeue is asked when needed.

        Returns:
            The batch's :class:`~hydra_plugins.caitlab_launcher.plan.Plan`.
        """
        jobs = [(list(o), self.sweep_plan.run_dir(list(o))) for o in job_overrides]
        sweep_dir = self._sweep_dir()
        removed: tuple[planning.Gone, ...] = ()
        # with max_batch_size a batch is not the whole grid
        if not OmegaConf.select(self.config, "hydra.sweeper.max_batch_size") and \
                sweep_dir.is_dir():
            wanted = [self.sweep_plan.run_dir(list(o)).name
                      for o in (job_overrides if whole is None else whole)]
            removed = planning.gone(sweep_dir, wanted)
        return planning.make_plan(
            jobs, retry_failed=bool(self.config.get("retry_failed", False)),
            live_job=live_job or follow.Squeue(self.cluster).live_job, removed=removed)

    def submit(self, job_overrides: Any, initial_job_idx: int, *, whole: Any = None,
               tidy: bool = True) -> submitting.Submission:
        """Plans the batch and acts on the plan: the blocked runs' summaries, the runs no
        longer in the sweep, then the runs to run or resume submitted as job arrays (an array
        per group waiting for the same upstream jobs, with ``afterok`` on them), each run's
        ``summary.json`` saying ``pending`` until its job starts.

        Args:
            job_overrides: the batch's jobs' overrides.
            initial_job_idx: Hydra's number of the batch's first job.
            whole: every job of the sweep, where the batch is one stage of it.
            tidy: first remove the code snapshots of finished sweeps.

        Returns:
            The :class:`~hydra_plugins.caitlab_launcher.submit.Submission`; :meth:`results`
            follows it.
        """
        sweep_dir = self._sweep_dir()
        if tidy:
            snapshot.clean(sweep_dir)
        queue = follow.Squeue(self.cluster)  # asked once, as the batch is planned
        planned = self.plan(job_overrides, whole=whole, live_job=queue.live_job)
        self._not_submitted(planned)
        self._removed(planned, sweep_dir, queue)
        log.info(f"caitlab sweep: {len(planned.to_submit)} to run, {len(planned.not_submitted)} "
                 f"already done ({sweep_dir})")
        if not planned.to_submit:
            return submitting.Submission(planned)
        done = submitting.submit(self, planned, sweep_dir, initial_job_idx)
        for entry, job in done.jobs:
            RunRecord(entry.run_dir, self._facts(entry)).pending(str(job.job_id))
        arrays = sorted({job.job_id.split('_')[0] for _, job in done.jobs})
        log.info(f"submitted {len(done.jobs)} runs as job array{'s' * (len(arrays) > 1)} "
                 f"{', '.join(arrays)}")
        return done

    def results(self, submissions: list[submitting.Submission]) -> list[list[JobReturn]]:
        """Each submission's results, one per job of its batch, in the batch's order: a
        skipped or blocked run's, and, once they have ended (where ``wait`` is true), the
        submitted jobs' own; with ``wait: false``, a placeholder for each submitted job."""
        submitted = [(s, entry, job) for s in submissions for entry, job in s.jobs]
        ended: dict[tuple[int, int], JobReturn] = {}
        if submitted and not self.wait:
            log.info("not waiting (hydra.launcher.wait=false): follow it with "
                     f"caitlab-sweep status {self._sweep_dir()}")
        elif submitted:
            got = follow.wait([(job, e.overrides, e.run_dir) for _, e, job in submitted],
                              self._sweep_dir(), self.cluster)
            ended = {(id(s), e.index): r for (s, e, _), r in zip(submitted, got, strict=True)}
            for s in submissions:
                for code in s.codes:
                    snapshot.remove(code)  # every job has ended: no requeue can need it
        return [[ended.get((id(s), e.index)) or _not_followed(e) for e in s.plan.entries]
                for s in submissions]

    def launch(self, job_overrides: Any, initial_job_idx: int, *,
               whole: Any = None) -> list[JobReturn]:
        """hydra-submitit-launcher's ``launch`` for the runs the sweep still needs (see
        :meth:`submit`), as one job array running the code as submitted
        (caitlab.sweeps.snapshot).

        Args:
            job_overrides: the batch's jobs' overrides.
            initial_job_idx: Hydra's number of the batch's first job.
            whole: every job of the sweep, where the batch is one stage of it.

        Returns:
            One result per job, in the batch's order (:meth:`results`).
        """
        return self.results([self.submit(job_overrides, initial_job_idx, whole=whole)])[0]

    def _executor(self, after: tuple[str, ...] = ()) -> tuple[Any, str]:
        """(submitit's executor with this launcher's parameters, its folder)."""
        return submitting.executor(self, after)

    def _facts(self, entry: planning.Entry) -> dict[str, Any]:
        """What ``caitlab-sweep status`` shows of a run not started yet."""
        stage = next((o.split("=", 1)[1] for o in entry.overrides if o.startswith("stage=")),
                     None)
        return {"overrides": list(entry.overrides), "signature": entry.run_dir.name,
                "name": self.config.get("name"),
                **stage_facts(stage, self.config.get("stages") or {})}

    def _not_submitted(self, planned: planning.Plan) -> None:
        """Says why each job not submitted is not; a blocked one's summary says so."""
        for entry in planned.not_submitted:
            log.log(logging.WARNING if entry.failed else logging.INFO, f"\t{entry.line()}")
            if entry.action == planning.Action.BLOCKED:
                RunRecord(entry.run_dir, self._facts(entry)).block(
                    entry.blocked_by, entry.why or "", slurm_job_id=None)

    def _removed(self, planned: planning.Plan, sweep_dir: Path, queue: follow.Squeue) -> None:
        """Lists the runs of the sweep folder no longer in the sweep; with
        ``cancel_removed=true``, cancels their live jobs (as Dora's grids do)."""
        if not planned.removed:
            return
        log.warning(f"{len(planned.removed)} runs of {sweep_dir} are no longer in the sweep:")
        for gone in planned.removed:
            log.warning(f"\t{gone.run_dir.name} ({gone.summary.get('status')}): "
                        f"{' '.join(map(str, gone.summary.get('overrides') or []))}")
        found = queue()
        if not self.cancel_removed or found is None:
            log.warning("\thydra.launcher.cancel_removed=true cancels their SLURM jobs")
            return
        runs = [(gone.run_dir, dict(gone.summary)) for gone in planned.removed]
        for folder, job in slurm.cancel_runs(runs, found):
            log.warning(f"\tcancelled {folder.name} (job {job}): no longer in the sweep")


def _not_followed(entry: planning.Entry) -> JobReturn:
    """Hydra's record of a job not run here, or submitted and not waited for (its value
    unknown yet)."""
    if entry.submitted:
        return follow.returned(entry.overrides)
    return follow.returned(entry.overrides, entry.result, entry.why if entry.failed else None)


class SlurmLauncher(_SweepAwareMixin, hsl.SlurmLauncher):
    cluster = "slurm"  # submitit's name for the executor


class LocalLauncher(_SweepAwareMixin, hsl.LocalLauncher):
    cluster = "local"


class SweepAwareSweeper(compat.BasicSweeper):
    """Hydra's basic sweeper (same ``params``, same batches), whose check that every job
    composes before any is launched goes through a ``SweepPlan``: Hydra's own check composes
    each job in full. With caitlab's launchers the compositions are the launcher's, so that
    each also serves to find the jobs' run folders. An experiment with ``stages`` is swept
    as a chain (``chain``)."""

    def compositions(self) -> compose.SweepPlan:
        """The launcher's ``SweepPlan``, or this sweeper's own with another launcher."""
        found = getattr(self.launcher, "sweep_plan", None)  # None: not a caitlab launcher
        if found is None:
            if getattr(self, "_own_plan", None) is None:
                self._own_plan = compose.SweepPlan(self.hydra_context.config_loader, self.config)
            found = self._own_plan
        return found

    def validate_batch_is_legal(self, batch: Any) -> None:
        compositions = self.compositions()
        for overrides in batch:
            compositions.config(list(overrides))

    def sweep(self, arguments: list[str]) -> Any:
        """Hydra's sweep; for an experiment with ``stages`` (caitlab.stages), the chain."""
        stages = self.config.get("stages")
        if not stages:
            return super().sweep(arguments)
        return chain.sweep(self, stages, arguments,
                           sweep_aware=isinstance(self.launcher, _SweepAwareMixin))


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
