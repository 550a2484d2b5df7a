"""Following submitted jobs: what SLURM says of them while they wait, and their results.

A waiting launcher logs each job's pending reason as it changes, stops once every job still
queued can never start, cancels (and marks ``blocked``) a stage whose upstream job failed,
and turns each job's end into Hydra's ``JobReturn``: a job that died without a result is a
failed run saying why, not an exception that hides the others' results.
"""

import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus

from caitlab import stages
from caitlab.config import ConfigError
from caitlab.record import RunFailed, RunRecord, read_summary
from caitlab.status import LIVE
from caitlab.sweeps import slurm
from caitlab.training.ranks import first_rank_error

log = logging.getLogger(__name__)

FOLLOW_POLL_S = 2.0  # how often a waiting launcher asks SLURM why its jobs wait


def returned(overrides: list[str] | tuple[str, ...], result: Any = None,
             failed: str | None = None) -> JobReturn:
    """Hydra's record of a job this process did not run.

    Args:
        overrides: the job's overrides.
        result: its value (a completed run's test accuracy).
        failed: why it counts as failed, its value then: Hydra's sweeper raises it once the
            batch is done, so that the sweep's exit status says so (caitlab.train.main).
    """
    ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
    ret.return_value = result
    if failed is not None:
        ret.status, ret.return_value = JobStatus.FAILED, RunFailed(failed)
    return ret


class Squeue:
    """squeue's answer for one launch: asked once, on first use, and only where a run's
    summary says its job may be alive; off SLURM, never.

    Args:
        cluster: submitit's executor, ``slurm`` or ``local``.
    """

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self._queue: slurm.Queue | None = None

    def __call__(self) -> slurm.Queue | None:
        """The queue; None off SLURM, an empty one (with a warning) where squeue cannot say."""
        if self.cluster != "slurm":
            return None
        if self._queue is None:
            try:
                self._queue = slurm.query_queue(30)
            except slurm.SqueueUnavailable as err:
                log.warning(f"squeue unavailable ({err}): jobs still queued are not seen")
                self._queue = slurm.Queue()
        return self._queue

    def live_job(self, summary: Mapping[str, Any]) -> str | None:
        """The run's SLURM job where it is still queued or running: a re-launch must not
        submit a second job for the same folder."""
        if summary.get("status") not in LIVE:
            return None
        queue = self()
        return None if queue is None else slurm.live_job(dict(summary), queue)


def follow(jobs: list[Any], run_dirs: list[Path], sweep_dir: Path) -> dict[str, str]:
    """Waits for every job of the array to end, logging a job's pending reason each time it
    changes.

    A stage whose upstream failed never starts (``DependencyNeverSatisfied``): its job is
    cancelled and its run marked ``blocked``.

    Args:
        jobs: submitit's jobs.
        run_dirs: each job's run folder.
        sweep_dir: the sweep folder, for the line that says how to cancel.

    Returns:
        {job id: the line why} of the stages cancelled as blocked.

    Raises:
        ConfigError: naming what to change, once every job still queued can never start
            (they stay queued: ``caitlab-sweep cancel`` or a fix of the partition ends it).
    """
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
    record = RunRecord(run_dir)
    refs = stages.references(record.get("overrides") or [])
    line = (stages.blocked_reason(refs[0], read_summary(run_dir.parent / refs[0].signature))
            if refs else None) or "blocked: the job it waits for failed"
    slurm.cancel([str(job.job_id)])
    record.block(refs[0].signature if refs else None, line)
    log.warning(f"job {job.job_id} ({run_dir.name}) {line}")
    return line


def wait(jobs: list[tuple[Any, list[str] | tuple[str, ...], Path]], sweep_dir: Path,
         cluster: str) -> list[JobReturn]:
    """Waits for the jobs to end (following SLURM's queue where they are SLURM's).

    Args:
        jobs: (submitit's job, its overrides, its run folder) of each job.
        sweep_dir: the sweep folder.
        cluster: submitit's executor, ``slurm`` or ``local``.

    Returns:
        Each job's result, in order.
    """
    run_dirs = [run_dir for *_, run_dir in jobs]
    blocked = follow([j for j, *_ in jobs], run_dirs, sweep_dir) if cluster == "slurm" else {}
    return [returned(overrides, failed=blocked[job.job_id])
            if job.job_id in blocked else result(job, overrides, run_dir)
            for job, overrides, run_dir in jobs]


def result(job: Any, overrides: list[str] | tuple[str, ...], run_dir: Path) -> JobReturn:
    """The job's own result; a failed one, saying why, where it died without one (a job that
    died hard must not hide the others' results)."""
    try:
        return job.results()[0]
    except Exception as err:
        # a run that failed: its job raised the run's own line (ArrayTask), in the trace
        failed = re.search(rf"^{re.escape(RunFailed.__module__)}\.RunFailed: (.+)$", str(err),
                           re.MULTILINE)
        if failed:
            return returned(overrides, failed=failed[1])
        line = (f"job {job.job_id} ({run_dir}) ended without a result: "
                f"{str(err).strip().splitlines()[-1] if str(err).strip() else err}")
        line = _rank_failure(run_dir, line)
        log.error(line)
        return returned(overrides, failed=line)


def _rank_failure(run_dir: Path, line: str) -> str:
    """Where a DDP job ended because one of its tasks failed (srun --kill-on-bad-exit ends the
    others before rank 0 can write anything), the run's summary says so, naming that rank's
    error (``error.rank<k>.log``); ``line`` with the rank's cause in front."""
    summary = read_summary(run_dir) or {}
    others = first_rank_error(run_dir)
    if others is None or summary.get("status") not in LIVE:
        return line
    first, by_rank = others
    line = f"{first}; {line}"
    RunRecord(run_dir).fail(line, rank_errors=by_rank)
    return line
