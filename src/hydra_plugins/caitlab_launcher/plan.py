"""What a launch does with each job of a sweep, decided before anything is written.

:func:`make_plan` reads the run folders (their summaries and checkpoints) and asks whether a
run's SLURM job is still alive; it returns a :class:`Plan` and writes nothing. The launcher
acts on the plan (``caitlab_launcher.launcher``): it writes the summaries of blocked runs,
submits the runs to run or resume, and marks them pending. Kept apart, a plan can be shown
(a dry run) or extended (seeds added between rounds) before anything happens to the folders.
"""

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caitlab import stages
from caitlab.record import has_checkpoint, read_summary, skip_reason
from caitlab.status import Status
from caitlab.training.lifecycle import skipped_message


class Action(enum.StrEnum):
    """What the launch does with a job. A ``StrEnum``: Hydra's plugin scan executes this
    module a second time, and members of either execution compare equal as strings."""

    # Submitted; its folder holds no checkpoint, so the job starts from scratch.
    RUN = "run"
    # Submitted; its job resumes from the checkpoint its folder holds (interrupted, cancelled).
    RESUME = "resume"
    # Not submitted: completed, failed or diverged before (without retry_failed=true), or its
    # job is still queued or running.
    SKIP = "skip"
    # Not submitted: a stage whose upstream stage ended without completing.
    BLOCKED = "blocked"


SUBMITTED = (Action.RUN, Action.RESUME)


@dataclass(frozen=True)
class Entry:
    """One job of the sweep and what the launch does with it.

    Args:
        index: the job's place in the batch (Hydra numbers it ``initial_job_idx + index``).
        overrides: the job's overrides, as the sweep gives them.
        run_dir: the run folder it trains in.
        action: run, resume, skip or blocked.
        why: for a skip or a block, the line that says why.
        failed: the skip counts as a failed run (the sweep exits 1): failed or diverged
            before, or blocked.
        blocked_by: for a block, the signature of the upstream run it waits on.
        after: the upstream stages' SLURM jobs, still queued or running, that it waits for
            (submitted with ``--dependency=afterok`` on them).
        result: the run's test accuracy where it completed before (its value for Hydra).
    """

    index: int
    overrides: tuple[str, ...]
    run_dir: Path
    action: Action
    why: str | None = None
    failed: bool = False
    blocked_by: str | None = None
    after: tuple[str, ...] = ()
    result: Any = None

    @property
    def submitted(self) -> bool:
        return self.action in SUBMITTED

    def line(self) -> str:
        """What the launcher logs for a job it does not submit."""
        return f"skipping {' '.join(self.overrides)}: {self.why}"


@dataclass(frozen=True)
class Gone:
    """A run of the sweep folder that is no longer one of the sweep's jobs.

    Args:
        run_dir: its folder.
        summary: its ``summary.json`` as read when planning (its status and SLURM job).
    """

    run_dir: Path
    summary: Mapping[str, Any] = field(compare=False)


@dataclass(frozen=True)
class Plan:
    """What a launch does with each job of a batch, in the batch's order.

    Args:
        entries: one per job.
        removed: the runs of the sweep folder no longer in the sweep (empty where the batch
            is not the whole sweep).
    """

    entries: tuple[Entry, ...]
    removed: tuple[Gone, ...] = ()

    @property
    def to_submit(self) -> tuple[Entry, ...]:
        """The jobs to submit (run or resume), in order."""
        return tuple(e for e in self.entries if e.submitted)

    @property
    def not_submitted(self) -> tuple[Entry, ...]:
        """The jobs skipped or blocked, in order."""
        return tuple(e for e in self.entries if not e.submitted)

    def arrays(self) -> list[tuple[tuple[str, ...], tuple[Entry, ...]]]:
        """The jobs to submit, grouped by the upstream jobs they wait for: (those jobs, the
        group), one job array each, in the order of each group's first job."""
        groups: dict[tuple[str, ...], list[Entry]] = {}
        for entry in self.to_submit:
            groups.setdefault(entry.after, []).append(entry)
        return [(after, tuple(group)) for after, group in groups.items()]


LiveJob = Callable[[Mapping[str, Any]], "str | None"]


def make_plan(jobs: Sequence[tuple[Sequence[str], Path]], *, retry_failed: bool,
              live_job: LiveJob, removed: Iterable[Gone] = ()) -> Plan:
    """The plan for a batch of jobs; reads the run folders, writes nothing.

    Args:
        jobs: each job's overrides and run folder, in the batch's order.
        retry_failed: run again the runs that failed or diverged before.
        live_job: the SLURM job of a run's summary where that job is still queued or
            running, else None (always None off SLURM).
        removed: the runs of the sweep folder no longer in the sweep (:func:`gone`).

    Returns:
        The :class:`Plan`, one entry per job.
    """
    entries = tuple(_entry(i, tuple(overrides), Path(run_dir), retry_failed, live_job)
                    for i, (overrides, run_dir) in enumerate(jobs))
    return Plan(entries, tuple(removed))


def _entry(index: int, overrides: tuple[str, ...], run_dir: Path, retry_failed: bool,
           live_job: LiveJob) -> Entry:
    """A job's entry, the first that holds of: completed (skip); a stage whose upstream did
    not complete (blocked, even where it failed itself); failed or diverged before (skip,
    unless ``retry_failed``); its job still alive (skip); else run, or resume where its
    folder holds a checkpoint."""
    previous = read_summary(run_dir) or {}
    reason = skip_reason(previous, retry_failed)

    def entry(action: Action, **more: Any) -> Entry:
        return Entry(index, overrides, run_dir, action, result=previous.get("test/top1"),
                     **more)

    if reason == Status.COMPLETED:
        return entry(Action.SKIP, why=f"{reason} ({run_dir})")
    after, blocked = _upstream(overrides, run_dir, live_job)
    if blocked is not None:
        why, upstream = blocked
        return entry(Action.BLOCKED, why=why, failed=True, blocked_by=upstream)
    if reason is not None:
        return entry(Action.SKIP, why=skipped_message(previous, run_dir), failed=True)
    if (live := live_job(previous)) is not None:
        return entry(Action.SKIP, why=f"its job {live} is still queued or running")
    return entry(Action.RESUME if has_checkpoint(run_dir) else Action.RUN, after=after)


def _upstream(overrides: Sequence[str], run_dir: Path, live_job: LiveJob
              ) -> tuple[tuple[str, ...], tuple[str, str] | None]:
    """(the upstream jobs a stage's job waits for, still queued or running; (why, the
    upstream's signature) where an upstream ended without completing, else None)."""
    waits = []
    for ref in stages.references(overrides):
        up = read_summary(run_dir.parent / ref.signature)
        if up is not None and up.get("status") != Status.COMPLETED \
                and (job := live_job(up)) is not None:
            waits.append(job)
            continue
        reason = stages.blocked_reason(ref, up)
        if reason is not None:
            return (), (reason, ref.signature)
    return tuple(sorted(waits)), None


def gone(sweep_dir: Path, wanted: Iterable[str]) -> tuple[Gone, ...]:
    """The runs of ``sweep_dir`` (folders with a readable summary) whose folder name is not
    in ``wanted``, in order of name; reads, writes nothing."""
    names = set(wanted)
    return tuple(Gone(p.parent, s) for p in sorted(Path(sweep_dir).glob("*/summary.json"))
                 if p.parent.name not in names and (s := read_summary(p.parent)))
