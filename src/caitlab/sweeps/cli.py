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
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from caitlab.analysis.report import Run, collect_runs, device_hours
from caitlab.status import ACTIVE, DISPLAY_ORDER, Status, diverged_label
from caitlab.sweeps import slurm
from caitlab.sweeps.slurm import (
    SLURM_ENDED,
    SLURM_QUEUED,
    SQUEUE_TIMEOUT_S,
    SqueueUnavailable,
    query_squeue,
    squeue_states,
)

__all__ = ["SqueueUnavailable", "build_parser", "main", "query_squeue", "squeue_states"]


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
        return f"{self.metric * 100:.2f} ({self.metric_name.split('/')[0]})"


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


def _overrides(summary: dict[str, Any]) -> list[str]:
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
    overrides = varying_overrides([_overrides(run.summary) for run in runs])
    statuses = []
    for run, shown in zip(runs, overrides, strict=True):
        s = run.summary
        state, label, live = reconcile(s, squeue)
        completed = s.get("status") == Status.COMPLETED and s.get("test/top1") is not None
        metric_name = "test/top1" if completed else "val/top1"
        job = s.get("slurm_job_id")
        hours = s.get("device_hours")
        statuses.append(RunStatus(
            signature=str(s.get("signature") or run.folder.name),
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

def sweep_runs(sweep_dir: Path) -> list[Run]:
    """The sweep's run folders (none for a folder that does not exist)."""
    return collect_runs(sweep_dir) if sweep_dir.is_dir() else []


def _error(message: str) -> int:
    print(f"caitlab-sweep: error: {message}", file=sys.stderr)
    return 2


def cmd_status(args: argparse.Namespace) -> int:
    sweep_dir: Path = args.sweep_dir
    if not sweep_dir.is_dir():
        return _error(f"{sweep_dir} is not a folder")
    runs = sweep_runs(sweep_dir)
    if not runs:
        return _error(f"no runs (summary.json) under {sweep_dir}")
    from caitlab.sweeps.snapshot import clean

    clean(sweep_dir)  # code snapshots of submissions whose runs have all finished
    note, queue = None, None
    try:
        queue = slurm.query_queue(args.squeue_timeout)
    except SqueueUnavailable as err:
        note = f"(squeue unavailable: {err})"
    statuses = run_states(runs, queue and queue.states, queue and queue.reasons)
    if args.json:
        if note:
            print(note, file=sys.stderr)
        print(json.dumps([asdict(s) for s in statuses], indent=2))
        return 0
    if note:
        print(note)
    print(format_table(statuses))
    print(counts_line(statuses, device_hours(runs)))
    for line in never_starts_lines(statuses):
        print(line)
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
    runs = sweep_runs(args.sweep_dir)
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


def matches(overrides: list[str], patterns: list[str]) -> bool:
    """Whether, for every ``KEY=VALUE`` pattern, the run has an override of KEY whose value
    matches VALUE (fnmatch: ``model.depth=1*``, ``model=cait_*``)."""
    from fnmatch import fnmatchcase

    given = {}
    for line in overrides:
        key, _, value = line.partition("=")
        given[key.lstrip("+~")] = value
    for pattern in patterns:
        key, _, value = pattern.partition("=")
        if key.lstrip("+~") not in given or not fnmatchcase(given[key.lstrip("+~")], value):
            return False
    return True


def cmd_cancel(args: argparse.Namespace) -> int:
    runs = sweep_runs(args.sweep_dir)
    if not runs:
        return _error(f"no runs (summary.json) under {args.sweep_dir}")
    bad = [p for p in args.patterns if "=" not in p]
    if bad:
        return _error(f"{bad[0]!r}: a pattern is KEY=VALUE (model.depth=2, model=cait_*)")
    chosen = [r for r in runs if matches(_overrides(r.summary), args.patterns)]
    if not chosen:
        return _error(f"no run of {args.sweep_dir} has the overrides {' '.join(args.patterns)}")
    try:
        queue = slurm.query_queue(args.squeue_timeout)
        done = slurm.cancel_runs([(r.folder, r.summary) for r in chosen], queue)
    except SqueueUnavailable as err:
        return _error(f"SLURM cannot be asked: {err}")
    shown = dict(zip((r.folder for r in runs),
                     varying_overrides([_overrides(r.summary) for r in runs]), strict=True))
    for folder, job in done:
        print(f"cancelled {folder.name} (job {job})  {' '.join(shown[folder])}")
    print(f"{len(done)} of {len(chosen)} matching runs cancelled"
          + ("" if len(done) == len(chosen) else " (the others have no live job)")
          + ("; re-launching the sweep resumes them" if done else ""))
    return 0


DOCS = 'Docs: "Console scripts" in the docs site (make docs; site/reference/cli.html)'


def _wrap(text: str) -> str:
    import textwrap

    return textwrap.fill(text, 78)


def _examples(*lines: str) -> str:
    return "\n".join(("Examples:", *lines, DOCS))


def _add_command(sub, name: str, summary: str, description: str, examples: tuple[str, ...],
                 func) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=summary, description=_wrap(description),
                            epilog=_examples(*examples),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=func)
    return parser


def _squeue_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--squeue-timeout", type=float, default=SQUEUE_TIMEOUT_S, metavar="S",
                        help="seconds to wait for SLURM's squeue to answer "
                             "(default: %(default)g)")


def build_parser() -> argparse.ArgumentParser:
    """The ``caitlab-sweep`` command line and its subcommands (also read by the docs' CLI
    reference)."""
    parser = argparse.ArgumentParser(
        prog="caitlab-sweep", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_wrap(
            "Follow and manage the runs of a sweep: where each run stands, its logs, what "
            "sets it apart, and cancelling its SLURM jobs. It reads the run folders under a "
            "sweep folder (outputs/<name>) and, where the runs were submitted to SLURM, asks "
            "squeue how their jobs stand. Each command has its own help: caitlab-sweep "
            "COMMAND --help."),
        epilog=_examples("caitlab-sweep status outputs/demo",
                         "caitlab-sweep log outputs/demo 3 --tail 50",
                         "caitlab-sweep cancel outputs/demo 'model=cait_*'",
                         "caitlab-sweep show outputs/demo/e3b0b2d272"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands", help="what to do, one of:")
    status = _add_command(
        sub, "status", "the state of every run of a sweep",
        "Print one line per run folder of a sweep: its state, SLURM job and that job's live "
        "state, epochs done, last top-1, attempts and the overrides that tell the runs apart, "
        "then how many runs are in each state. A run whose job ended without writing its "
        "final state (killed, node failure) is shown as lost, and a job that can never start "
        "says which setting to change. It writes nothing, but deletes the code snapshots of "
        "submissions whose runs have all finished.",
        ("caitlab-sweep status outputs/demo", "caitlab-sweep status outputs/demo --json",
         "caitlab-sweep status outputs/residual_vs_depth --squeue-timeout 30"), cmd_status)
    status.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR",
                        help="the sweep folder, e.g. outputs/demo")
    status.add_argument("--json", action="store_true",
                        help="print the runs as a JSON list instead of a table (default: off)")
    _squeue_timeout(status)
    show = _add_command(
        sub, "show", "what makes a run folder differ from the defaults",
        "Print one line per run folder: the settings that make it differ from caitlab's "
        "defaults, its state, its test top-1 once it has one, and the version of the code "
        "(git commit) that produced it. Reads each folder's summary.json; writes nothing.",
        ("caitlab-sweep show outputs/demo/e3b0b2d272",
         "caitlab-sweep show outputs/demo/e3b0b2d272 outputs/demo/8aac04fac3"), cmd_show)
    show.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR",
                      help="one or more run folders, e.g. outputs/demo/e3b0b2d272")
    logs = _add_command(
        sub, "log", "the end of a run's job output and train.log",
        "Print the last lines of one run's logs: the output its SLURM job wrote (stdout, or "
        "stderr with --err), then the run's own train.log. Name the run by its signature (or "
        "the start of it) or by its row number in caitlab-sweep status. Writes nothing.",
        ("caitlab-sweep log outputs/demo 3", "caitlab-sweep log outputs/demo 1a2b --err",
         "caitlab-sweep log outputs/demo 3 --tail 0"), cmd_log)
    logs.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR",
                      help="the sweep folder, e.g. outputs/demo")
    logs.add_argument("run", metavar="RUN",
                      help="the run's signature (or enough of its start to be unique), or "
                           "its row number in caitlab-sweep status")
    logs.add_argument("--tail", type=int, default=20, metavar="N",
                      help="show the last N lines of each file; 0 shows them all "
                           "(default: %(default)s)")
    logs.add_argument("--err", action="store_true",
                      help="show the job's stderr instead of its stdout (default: off)")
    cancel = _add_command(
        sub, "cancel", "cancel a sweep's SLURM jobs, or those of matching runs",
        "Cancel (scancel) the live SLURM jobs of a sweep, or only those of the runs whose "
        "overrides match every KEY=VALUE pattern given. Each cancelled run's summary.json "
        "then says cancelled (it waits up to a minute for the jobs to end); launching the "
        "sweep again resumes those runs.",
        ("caitlab-sweep cancel outputs/demo", "caitlab-sweep cancel outputs/demo 'model=cait_*'",
         "caitlab-sweep cancel outputs/residual_vs_depth 'model.depth=1*' residual=none"),
        cmd_cancel)
    cancel.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR",
                        help="the sweep folder, e.g. outputs/demo")
    cancel.add_argument("patterns", nargs="*", metavar="KEY=VALUE",
                        help="only cancel the runs with an override of KEY whose value "
                             "matches VALUE (* and ? as in file names); all given must match "
                             "(default: every run of the sweep)")
    _squeue_timeout(cancel)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
