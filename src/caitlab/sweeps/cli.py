"""``caitlab-sweep``: where the runs of a sweep stand, reconciled with what SLURM says.

``caitlab-sweep status outputs/<name>`` prints one line per run folder (state, SLURM job and its
live state, epochs, last top-1, attempts, the overrides that tell the runs apart), then a count
per state. A run whose summary still says ``pending``/``running`` but whose SLURM job has ended
(killed by SIGKILL, node failure...) never wrote its final state: it is shown as ``lost``.

Stdlib only (plus the stdlib-only ``caitlab.analysis.report``): no torch, lightning or hydra
at import.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from caitlab.analysis.report import Run, collect_runs

SQUEUE_CMD = ("squeue", "--noheader", "--format=%i|%T", "--states=all", "--array")
SQUEUE_TIMEOUT_S = 5.0

# SLURM job states after which the job's processes are gone for good (squeue keeps such jobs
# for MinJobAge seconds). Every other state (PENDING, RUNNING, COMPLETING, SUSPENDED,
# REQUEUED, CONFIGURING...) means the job may still write its run folder.
SLURM_ENDED = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "TIMEOUT",
})
# Job states of a job waiting to (re)start.
SLURM_QUEUED = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD",
                          "SPECIAL_EXIT"})
# Summary states a job still has to move on from; the others are final for this attempt.
ACTIVE = ("pending", "running")
# Order of the counts line; states not listed here (unknown values) come last.
STATE_ORDER = ("completed", "running", "pending", "interrupted", "lost", "failed", "diverged",
               "unreadable")


class SqueueUnavailable(RuntimeError):
    """squeue is not installed, did not answer in time, or failed."""


@dataclass
class RunStatus:
    signature: str
    state: str  # key for the counts: a summary status, or "lost"
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

    @property
    def metric_text(self) -> str:
        if self.metric is None:
            return ""
        return f"{self.metric * 100:.2f} ({self.metric_name.split('/')[0]})"


# --- squeue -----------------------------------------------------------------------------------

def parse_squeue(text: str) -> dict[str, str]:
    """``id|STATE`` lines -> {job id: state}; array tasks appear as ``1234_5``."""
    states: dict[str, str] = {}
    for line in text.splitlines():
        job, sep, state = line.strip().partition("|")
        if sep and job:
            states[job.strip()] = state.strip().upper()
    return states


def query_squeue(timeout: float = SQUEUE_TIMEOUT_S) -> dict[str, str]:
    """All jobs squeue knows (one ``squeue`` call); raises SqueueUnavailable with the reason."""
    if shutil.which(SQUEUE_CMD[0]) is None:
        raise SqueueUnavailable("squeue not found on PATH")
    try:
        proc = subprocess.run(SQUEUE_CMD, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SqueueUnavailable(f"no answer in {timeout:g}s") from None
    except OSError as err:
        raise SqueueUnavailable(str(err)) from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise SqueueUnavailable(lines[-1] if lines else f"exit code {proc.returncode}")
    return parse_squeue(proc.stdout)


def squeue_states(timeout: float = SQUEUE_TIMEOUT_S) -> dict[str, str] | None:
    """Like query_squeue, but None when squeue is unavailable (never raises for that)."""
    try:
        return query_squeue(timeout)
    except SqueueUnavailable:
        return None


# --- reconcile (pure) -------------------------------------------------------------------------

def reconcile(summary: dict[str, Any],
              squeue: dict[str, str] | None) -> tuple[str, str, str | None]:
    """(state key, label, live SLURM state) of one run from its summary and squeue's jobs.

    ``squeue`` None means unknown: the folder's state is shown as it is.
    """
    status = str(summary.get("status") or "pending")
    job = summary.get("slurm_job_id")
    job = str(job) if job not in (None, "") else None
    live = squeue.get(job) if (squeue is not None and job) else None

    if status == "diverged":
        return status, f"diverged at epoch {summary.get('diverged_epoch', '?')}", live
    if squeue is None or job is None:  # nothing to reconcile with; local runs are never lost
        return status, status, live
    if status in ACTIVE:
        if live is None or live in SLURM_ENDED:
            return "lost", f"lost (last: {status})", live
        if live not in SLURM_QUEUED:  # RUNNING, COMPLETING, SUSPENDED...
            return "running", "running", live
        if status == "running":  # job back in the queue: requeued without a final state
            return "pending", "pending (requeued, last: running)", live
        return "pending", "pending", live
    if status == "interrupted" and live is not None and live not in SLURM_ENDED:
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


def _overrides(summary: dict[str, Any]) -> list[str]:
    value = summary.get("overrides") or []
    return [str(o) for o in value] if isinstance(value, list) else [str(value)]


def run_states(runs: list[Run], squeue: dict[str, str] | None) -> list[RunStatus]:
    """One RunStatus per run folder, reconciled with ``squeue`` ({job id: state} or None)."""
    overrides = varying_overrides([_overrides(run.summary) for run in runs])
    statuses = []
    for run, shown in zip(runs, overrides, strict=True):
        s = run.summary
        state, label, live = reconcile(s, squeue)
        completed = s.get("status") == "completed" and s.get("test/top1") is not None
        metric_name = "test/top1" if completed else "val/top1"
        job = s.get("slurm_job_id")
        statuses.append(RunStatus(
            signature=str(s.get("signature") or run.folder.name),
            state=state,
            label=label,
            folder=str(run.folder),
            summary_status=str(s.get("status") or "pending"),
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
        ))
    return statuses


def counts_line(statuses: list[RunStatus]) -> str:
    counts = Counter(s.state for s in statuses)
    order = [k for k in STATE_ORDER if k in counts] + sorted(set(counts) - set(STATE_ORDER))
    noun = "run" if len(statuses) == 1 else "runs"
    return f"{len(statuses)} {noun}: " + ", ".join(f"{counts[k]} {k}" for k in order)


def format_table(statuses: list[RunStatus]) -> str:
    header = ("signature", "state", "job", "slurm", "epochs", "top1 %", "attempts", "overrides")
    rows = [header] + [(
        s.signature, s.label, s.slurm_job_id or "-", s.slurm_state or "-",
        "" if s.epochs is None else str(s.epochs), s.metric_text,
        "" if s.attempts is None else str(s.attempts), " ".join(s.overrides),
    ) for s in statuses]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True))
        + "  " + row[-1]
        for row in rows
    )


# --- CLI --------------------------------------------------------------------------------------

def _error(message: str) -> int:
    print(f"caitlab-sweep: error: {message}", file=sys.stderr)
    return 2


def cmd_status(args: argparse.Namespace) -> int:
    sweep_dir: Path = args.sweep_dir
    if not sweep_dir.is_dir():
        return _error(f"{sweep_dir} is not a folder")
    runs = collect_runs(sweep_dir)
    if not runs:
        return _error(f"no runs (summary.json) under {sweep_dir}")
    from caitlab.sweeps.snapshot import clean

    clean(sweep_dir)  # code snapshots of submissions whose runs have all finished
    note = None
    try:
        squeue = query_squeue(args.squeue_timeout)
    except SqueueUnavailable as err:
        squeue, note = None, f"(squeue unavailable: {err})"
    statuses = run_states(runs, squeue)
    if args.json:
        if note:
            print(note, file=sys.stderr)
        print(json.dumps([asdict(s) for s in statuses], indent=2))
        return 0
    if note:
        print(note)
    print(format_table(statuses))
    print(counts_line(statuses))
    return 0


def show_line(run_dir: Path, summary: dict[str, Any]) -> str:
    """What makes a run differ from the defaults, its state and the code that produced it."""
    from caitlab.identity import describe
    from caitlab.provenance import commit_of

    delta = summary.get("delta")
    what = describe(delta) if delta is not None else (
        " ".join(summary.get("overrides") or []) or "(the defaults)") + \
        "  (overrides: a run of caitlab before signatures from the delta)"
    facts = [str(summary.get("status", "?"))]
    if summary.get("test/top1") is not None:
        facts.append(f"test/top1 {100 * summary['test/top1']:.1f}")
    commit = commit_of(summary)
    if commit:
        facts.append(f"code {commit}")
    return f"{run_dir.name}: {what}  [{', '.join(facts)}]"


def cmd_show(args: argparse.Namespace) -> int:
    code = 0
    for run_dir in args.run_dirs:
        path = run_dir / "summary.json"
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            code = _error(f"{path}: not a run folder's summary ({err.__class__.__name__})")
            continue
        print(show_line(run_dir, summary))
    return code


def find_run(runs: list[Run], which: str) -> Run | str:
    """The run ``which`` names: a signature (or a unique start of one), or its 1-based row in
    ``caitlab-sweep status``; else the line saying why none."""
    if which.isdigit() and not any(r.folder.name.startswith(which) for r in runs):
        row = int(which)
        return runs[row - 1] if 1 <= row <= len(runs) else \
            f"row {row}: the sweep has {len(runs)} runs"
    found = [r for r in runs if r.folder.name.startswith(which)]
    if len(found) == 1:
        return found[0]
    if not found:
        return f"no run {which!r} in the sweep (signatures: " \
               f"{', '.join(r.folder.name for r in runs[:8])}{', ...' if len(runs) > 8 else ''})"
    return f"{which!r} starts {len(found)} signatures: give more of it"


def log_files(sweep_dir: Path, run: Run, err: bool) -> list[Path]:
    """The job's stdout (stderr with ``err``) as submitit wrote it, then the run's train.log."""
    job = run.summary.get("slurm_job_id") or run.summary.get("submitit_job_id")
    files = []
    if job:
        suffix = "err" if err else "out"
        files = sorted((sweep_dir / ".submitit").glob(f"*/{job}_*_log.{suffix}"))
    log = run.folder / "train.log"
    return [*files, *([log] if log.is_file() else [])]


def cmd_log(args: argparse.Namespace) -> int:
    runs = collect_runs(args.sweep_dir) if args.sweep_dir.is_dir() else []
    if not runs:
        return _error(f"no runs (summary.json) under {args.sweep_dir}")
    run = find_run(runs, args.run)
    if isinstance(run, str):
        return _error(run)
    files = log_files(args.sweep_dir, run, args.err)
    if not files:
        return _error(f"{run.folder}: no log yet (no train.log, no job output)")
    for path in files:
        lines = path.read_text(errors="replace").splitlines()
        print(f"==> {path} <==")
        print("\n".join(lines[-args.tail:] if args.tail else lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="caitlab-sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="state of every run of a sweep folder")
    status.add_argument("sweep_dir", type=Path, help="a sweep folder (outputs/<name>)")
    status.add_argument("--json", action="store_true", help="print a JSON list instead")
    status.add_argument("--squeue-timeout", type=float, default=SQUEUE_TIMEOUT_S,
                        metavar="S", help=f"seconds to wait for squeue (default "
                        f"{SQUEUE_TIMEOUT_S:g})")
    status.set_defaults(func=cmd_status)
    show = sub.add_parser("show", help="what makes a run folder differ from the defaults")
    show.add_argument("run_dirs", type=Path, nargs="+", metavar="run_dir",
                      help="a run folder (outputs/<name>/<signature>)")
    show.set_defaults(func=cmd_show)
    logs = sub.add_parser("log", help="a run's job output and train.log")
    logs.add_argument("sweep_dir", type=Path, help="a sweep folder (outputs/<name>)")
    logs.add_argument("run", help="its signature (or the start of it), or its row in status")
    logs.add_argument("--tail", type=int, default=20, metavar="N",
                      help="last N lines of each file (0: all; default 20)")
    logs.add_argument("--err", action="store_true", help="the job's stderr, not its stdout")
    logs.set_defaults(func=cmd_log)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
