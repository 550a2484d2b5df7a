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
import textwrap
from collections.abc import Callable
from dataclasses import asdict
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from caitlab.provenance import commit_of
from caitlab.record.sweep import Run, collect_runs, device_hours
from caitlab.sweeps import slurm
from caitlab.sweeps.slurm import SQUEUE_TIMEOUT_S, SqueueUnavailable, query_squeue, squeue_states
from caitlab.sweeps.snapshot import clean
from caitlab.sweeps.states import (
    RunStatus,
    counts_line,
    folder_of,
    format_table,
    never_starts_lines,
    overrides_of,
    reconcile,
    run_states,
    varying_overrides,
)

__all__ = ["RunStatus", "SqueueUnavailable", "build_parser", "counts_line", "format_table",
           "main", "never_starts_lines", "query_squeue", "reconcile", "run_states",
           "squeue_states", "varying_overrides"]


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
    clean(sweep_dir)  # code snapshots of submissions whose runs have all finished
    note, queue = None, None
    try:
        queue = slurm.query_queue(args.squeue_timeout)
    except SqueueUnavailable as err:
        note = f"(squeue unavailable: {err})"
    statuses = run_states(runs, queue.states if queue else None,
                          queue.reasons if queue else None)
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
    from caitlab.identity import describe  # Hydra, OmegaConf: only show needs them

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
    if which.isdigit() and not any(folder_of(r).name.startswith(which) for r in runs):
        row = int(which)
        return runs[row - 1] if 1 <= row <= len(runs) else \
            f"row {row}: the sweep has {len(runs)} runs"
    found = [r for r in runs if folder_of(r).name.startswith(which)]
    if len(found) == 1:
        return found[0]
    if not found:
        names = ", ".join(folder_of(r).name for r in runs[:8])
        return f"no run {which!r} in the sweep (signatures: {names}" \
               f"{', ...' if len(runs) > 8 else ''})"
    return f"{which!r} starts {len(found)} signatures: give more of it"


def log_files(sweep_dir: Path, run: Run, err: bool) -> list[Path]:
    """The job's stdout (stderr with ``err``) as submitit wrote it, then the run's train.log."""
    job = run.summary.get("slurm_job_id") or run.summary.get("submitit_job_id")
    files = []
    if job:
        suffix = "err" if err else "out"
        files = sorted((sweep_dir / ".submitit").glob(f"*/{job}_*_log.{suffix}"))
    log = folder_of(run) / "train.log"
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
    chosen = [r for r in runs if matches(overrides_of(r.summary), args.patterns)]
    if not chosen:
        return _error(f"no run of {args.sweep_dir} has the overrides {' '.join(args.patterns)}")
    try:
        queue = slurm.query_queue(args.squeue_timeout)
        done = slurm.cancel_runs([(r.folder, r.summary) for r in chosen], queue)
    except SqueueUnavailable as err:
        return _error(f"SLURM cannot be asked: {err}")
    shown = dict(zip((r.folder for r in runs),
                     varying_overrides([overrides_of(r.summary) for r in runs]), strict=True))
    for folder, job in done:
        print(f"cancelled {folder.name} (job {job})  {' '.join(shown[folder])}")
    print(f"{len(done)} of {len(chosen)} matching runs cancelled"
          + ("" if len(done) == len(chosen) else " (the others have no live job)")
          + ("; re-launching the sweep resumes them" if done else ""))
    return 0


DOCS = 'Docs: "Console scripts" in the docs site (make docs; site/reference/cli.html)'


def _wrap(text: str) -> str:
    return textwrap.fill(text, 78)


def _examples(*lines: str) -> str:
    return "\n".join(("Examples:", *lines, DOCS))


def _add_command(sub: Any, name: str, summary: str, description: str,
                 examples: tuple[str, ...],
                 func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=summary, description=_wrap(description),
                            epilog=_examples(*examples),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=func)
    return parser


def _sweep_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR",
                        help="the sweep folder, e.g. outputs/demo")


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
    _sweep_dir(status)
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
    _sweep_dir(logs)
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
    _sweep_dir(cancel)
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
