"""Where each run of a sweep stands: its summary's state reconciled with SLURM's queue (a run
whose job ended without writing a final state is ``lost``), and the lines ``caitlab-sweep
status`` prints of them.

Stdlib only: no torch, lightning or hydra at import.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caitlab.record.sweep import Run
from caitlab.status import ACTIVE, DISPLAY_ORDER, Status, diverged_label
from caitlab.sweeps import slurm
from caitlab.sweeps.slurm import SLURM_ENDED, SLURM_QUEUED


@dataclass
class RunStatus:
    signature: str
    state: str  # key for the counts: a summary status, or Status.LOST
    label: str  # what the table shows, e.g. "lost (last: running)", "diverged at epoch 3"
    folder: str
    summary_status: str
    slurm_job_id: str | None = None
    slurm_state: str | None = None  # live state from squeue; None: not listed / not asked
    epochs: int | None = None
    metric_name: str | None = None  # "test/top1" for completed runs, else "val/top1"
    metric: float | None = None  # a fraction, as in summary.json
    top1_best: float | None = None
    attempts: int | None = None
    overrides: list[str] = field(default_factory=list)  # the ones that vary in the sweep
    error: str | None = None
    updated_at: str | None = None
    reason: str | None = None  # squeue's reason why the job waits (BeginTime, Resources...)
    never_starts: str | None = None  # where that reason means never: what to change
    device_hours: float | None = None  # wall x devices over every attempt

    @property
    def metric_text(self) -> str:
        if self.metric is None:
            return ""
        return f"{self.metric * 100:.2f} ({(self.metric_name or '').split('/')[0]})"


# --- reconcile (pure) -------------------------------------------------------------------------

def reconcile(summary: dict[str, Any],
              squeue: dict[str, str] | None) -> tuple[str, str, str | None]:
    """(state key, label, live SLURM state) of one run from its summary and squeue's jobs.

    ``squeue`` None means unknown: the folder's state is shown as it is.
    """
    status = str(summary.get("status") or Status.PENDING)
    job = summary.get("slurm_job_id")
    job = str(job) if job not in (None, "") else None
    live = squeue.get(job) if (squeue is not None and job) else None

    if status == Status.DIVERGED:
        return status, diverged_label(summary), live
    if squeue is None or job is None:  # nothing to reconcile with; local runs are never lost
        return status, status, live
    if status in ACTIVE:
        if live is None or live in SLURM_ENDED:
            return Status.LOST, f"lost (last: {status})", live
        if live not in SLURM_QUEUED:  # RUNNING, COMPLETING, SUSPENDED...
            return Status.RUNNING, Status.RUNNING, live
        if status == Status.RUNNING:  # job back in the queue: requeued without a final state
            return Status.PENDING, "pending (requeued, last: running)", live
        return Status.PENDING, Status.PENDING, live
    if status == Status.INTERRUPTED and live is not None and live not in SLURM_ENDED:
        return status, "interrupted (requeued)", live
    return status, status, live


def varying_overrides(override_lists: list[list[str]]) -> list[list[str]]:
    """Drop the overrides every run shares; if none vary at all, keep them all."""
    if not override_lists:
        return []
    shared = set(override_lists[0]).intersection(*map(set, override_lists[1:]))
    varying = [[o for o in overrides if o not in shared] for overrides in override_lists]
    if not any(varying):
        return [list(overrides) for overrides in override_lists]
    return varying


def overrides_of(summary: dict[str, Any]) -> list[str]:
    value = summary.get("overrides") or []
    return [str(o) for o in value] if isinstance(value, list) else [str(value)]


def _waiting(status: RunStatus, reasons: dict[str, str] | None) -> None:
    """Adds squeue's reason to a waiting run's label, and where it means never, what to change."""
    reason = (reasons or {}).get(status.slurm_job_id or "")
    if status.state != Status.PENDING or status.slurm_state not in SLURM_QUEUED or not reason:
        return
    if slurm.upstream_failed(reason):  # a stage whose upstream failed: it never starts
        status.state, status.label, status.reason = (Status.BLOCKED, "blocked (upstream failed)",
                                                     reason)
        return
    status.reason, status.never_starts = reason, slurm.never_starts(reason)
    status.label += f" ({reason}{': never starts' if status.never_starts else ''})"


def run_states(runs: list[Run], squeue: dict[str, str] | None,
               reasons: dict[str, str] | None = None) -> list[RunStatus]:
    """One RunStatus per run folder, reconciled with ``squeue`` ({job id: state} or None);
    ``reasons``: squeue's {job id: why it waits}."""
    overrides = varying_overrides([overrides_of(run.summary) for run in runs])
    statuses = []
    for run, shown in zip(runs, overrides, strict=True):
        s = run.summary
        state, label, live = reconcile(s, squeue)
        completed = s.get("status") == Status.COMPLETED and s.get("test/top1") is not None
        metric_name = "test/top1" if completed else "val/top1"
        job = s.get("slurm_job_id")
        hours = s.get("device_hours")
        statuses.append(RunStatus(
            signature=str(s.get("signature") or folder_of(run).name),
            state=state,
            label=label,
            folder=str(run.folder),
            summary_status=str(s.get("status") or Status.PENDING),
            slurm_job_id=None if job in (None, "") else str(job),
            slurm_state=live,
            epochs=s.get("epochs"),
            metric_name=metric_name,
            metric=s.get(metric_name),
            top1_best=s.get("val/top1_best"),
            attempts=s.get("attempts"),
            overrides=shown,
            error=s.get("error"),
            updated_at=s.get("updated_at"),
            device_hours=hours if isinstance(hours, (int, float)) else None,
        ))
        _waiting(statuses[-1], reasons)
    return statuses


def counts_line(statuses: list[RunStatus], hours: float | None = None) -> str:
    """How many runs are in each state; with ``hours``, the sweep's device-hours."""
    counts = Counter(s.state for s in statuses)
    order = [k for k in DISPLAY_ORDER if k in counts] + sorted(set(counts) - set(DISPLAY_ORDER))
    noun = "run" if len(statuses) == 1 else "runs"
    line = f"{len(statuses)} {noun}: " + ", ".join(f"{counts[k]} {k}" for k in order)
    return line if hours is None else f"{line}; {hours:.3g} device-hours"


def never_starts_lines(statuses: list[RunStatus]) -> list[str]:
    """One line per run whose job can never start: its reason and the key to change."""
    return [f"{s.signature}: job {s.slurm_job_id} can never start ({s.reason}): "
            f"{s.never_starts}" for s in statuses if s.never_starts]


def format_table(statuses: list[RunStatus]) -> str:
    """The status table; a device-h column where any run recorded its device-hours."""
    costs = any(s.device_hours is not None for s in statuses)
    header = ("signature", "state", "job", "slurm", "epochs", "top1 %", "attempts",
              *(("device-h",) if costs else ()), "overrides")
    rows = [header] + [(
        s.signature, s.label, s.slurm_job_id or "-", s.slurm_state or "-",
        "" if s.epochs is None else str(s.epochs), s.metric_text,
        "" if s.attempts is None else str(s.attempts),
        *(("" if s.device_hours is None else f"{s.device_hours:.3g}",) if costs else ()),
        " ".join(s.overrides),
    ) for s in statuses]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True))
        + "  " + row[-1]
        for row in rows
    )


# --- CLI --------------------------------------------------------------------------------------


def folder_of(run: Run) -> Path:
    """The folder of a run read from a sweep folder (a run read from wandb has none)."""
    assert run.folder is not None
    return run.folder
