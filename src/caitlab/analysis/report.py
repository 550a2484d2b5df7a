"""``caitlab-report``: a sweep -> which variant wins, by how much, at what cost, and whether
it is more than noise.

Reads a sweep folder (every ``summary.json`` and ``metrics.csv`` below it) or a wandb project
(``--wandb-project``, through ``wandb.Api().runs``), and writes next to the sweep, and prints:

- a table, one row per variant: runs that differ only by seed are grouped into
  mean ± std (n); each variant's difference to a baseline (``--baseline KEY=VALUE``; by
  default the grid's first value of each varied key) in points of top-1 with its 95% CI and
  p-value, paired by seed where the seeds pair; runs in progress, failed or diverged keep
  their state. ``report.md`` as text, ``report.csv`` and ``report.json`` as numbers;
- a verdict per question (one key changed, the others held): ``layerscale vs none
  (cait_tiny, digits): +1.4 pts [0.6, 2.2] 98.8% CI, p=0.004 (Holm: 0.016), 8 paired
  seeds -> better``; all of a report's verdicts corrected together (``--correction``:
  Holm by default), each interval at the level its verdict is held to; runs that diverged
  or failed counted in the line, a line of its own where two arms diverge at different
  rates, and a question the runs cannot answer listed with why;
- plots (PNG): top-1 vs depth by residual scaling (paper Table 1 as a picture), top-1 vs MACs
  and vs images/s with the Pareto front, the validation curves as mean and band per variant;
- ``report.html``: all of it in one self-contained page;
- with ``--wandb``, the table, verdicts and plots in a summary run of the group.

The runs and variants are :mod:`report_runs`, the grid, baseline and verdicts
:mod:`report_answers` (their statistics :mod:`caitlab.analysis.stats`), the table
:mod:`report_table` (its architecture columns read from :mod:`caitlab.models.axes`), the plots
:mod:`report_plots`, the page :mod:`report_html`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from caitlab.analysis.report_answers import Answers, answers, few_seeds_note, metric_name
from caitlab.analysis.report_html import to_html
from caitlab.analysis.report_plots import write_plots
from caitlab.analysis.report_runs import (
    Variant,
    commits,
    group_variants,
    mixed_code_warning,
    runs_from_wandb,
    selection_warning,
)
from caitlab.analysis.report_table import (
    cell,
    data_rows,
    extra_axes,
    ordered,
    table_rows,
    tables,
    to_csv,
    to_markdown,
    variant_label,
)
from caitlab.analysis.report_verdicts import method_text
from caitlab.analysis.stats import CORRECTIONS, EXACT_MAX, MIN_SEEDS
from caitlab.errors import UserError
from caitlab.record import write_text_atomic
from caitlab.record.sweep import THROUGHPUT_RULE, Run, collect_runs, device_hours
from caitlab.secrets import wandb_mode
from caitlab.status import Status

__all__ = ["Report", "Run", "Variant", "answers", "build_parser", "build_report", "cell",
           "collect_runs", "commits", "data_rows", "extra_axes", "group_variants", "log_to_wandb",
           "main", "mixed_code_warning", "runs_from_wandb", "table_rows", "to_csv", "to_markdown",
           "variant_label", "write_plots"]


# --- the report --------------------------------------------------------------------------


@dataclass
class Report:
    rows: list[dict[str, str]]          # the table as shown (report.md)
    data: list[dict[str, Any]]          # the table as numbers (report.csv, report.json)
    answers: Answers
    notes: list[str]
    plots: list[Path] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def verdicts(self) -> list[str]:
        return [v.line() for v in self.answers.verdicts]

    def markdown(self) -> str:
        text = to_markdown(self.rows)
        if self.notes:
            text += "\n\n" + "\n".join(f"- {n}" for n in self.notes)
        if self.verdicts:
            text += (f"\n\nVerdicts ({metric_name(self.answers.metric)}; "
                     f"{self.method}):\n" + "\n".join(f"- {v}" for v in self.verdicts))
        return text

    @property
    def method(self) -> str:
        """How the verdicts are held together (the correction and what it controls)."""
        return method_text(self.answers.verdicts, self.answers.correction)

    def as_json(self, source: str) -> dict[str, Any]:
        a = self.answers
        return {"source": source, "metric": a.metric, "baseline": a.baseline,
                **({"stage_baselines": a.stage_baselines} if a.stage_baselines else {}),
                "varied": a.grid.keys, "notes": self.notes,
                "correction": a.correction, "correction_text": self.method,
                "verdicts": [{"line": v.line(), "question": v.question(), "key": v.key,
                              "value": v.value, "baseline": v.base, "context": v.context,
                              "data": v.data, "stage": v.stage, "kind": v.kind,
                              "outcome": v.outcome, "why": v.why,
                              "not_counted": v.not_counted, "macs_ratio": v.macs_ratio,
                              **dict.fromkeys(("delta", "low", "high", "p", "p_adjusted", "test",
                                               "n")),
                              **(asdict(v.test) if v.test else {})} for v in a.verdicts],
                "rows": self.data}


def _notes(answers: Answers) -> list[str]:
    notes = []
    if answers.baseline_variant is not None:
        notes.append(
            f"Δ top-1: each variant's {metric_name(answers.metric)} minus "
            f"{'that of its stage’s baseline' if answers.stage_baselines else 'the baseline’s'}"
            f" ({answers.baseline_text()}), in points, with its 95% CI; p: the test's p-value,"
            f" each on its own (the verdicts below are corrected together): paired over the "
            f"seeds both ran, by the exact sign-flip test up to {EXACT_MAX} pairs (its "
            f"interval the test inverted: none where the pairs are too few for 95%) and a "
            f"t-test above; Welch's where fewer than {MIN_SEEDS} pair.")
    elif answers.baseline:
        notes.append(f"the baseline ({answers.baseline_text()}) has no completed runs: "
                     "no differences; choose another with --baseline KEY=VALUE")
    notes.append(f"img/s: the {THROUGHPUT_RULE}, then the median over seeds.")
    few = few_seeds_note(answers)
    if few:
        notes.append(few)
    return notes


def build_report(runs: list[Run], out_dir: Path, by_commit: bool = False,
                 baseline: Iterable[str] = (), sweep_dir: Path | None = None,
                 title: str | None = None, correction: str = "holm") -> Report:
    """The table, answers and plots of ``runs``, written into ``out_dir`` (report.md,
    report.csv, report.json, report.html, plots/). ``correction``: how the verdicts are
    held together (:func:`caitlab.analysis.stats.correct`)."""
    variants = ordered(group_variants(runs, by_commit))
    answers_ = answers(variants, sweep_dir, baseline, correction)
    rows, data = tables(variants, answers_)
    if len(commits(runs)) < 2 and not by_commit:  # one version of the code: said once, below
        for row in rows:
            row.pop("code")
    report = Report(rows, data, answers_, _notes(answers_))
    out_dir.mkdir(parents=True, exist_ok=True)
    report.plots = write_plots(variants, out_dir / "plots", answers_)
    title = title or f"caitlab report: {out_dir.name}"
    files = {"report.md": report.markdown() + "\n", "report.csv": to_csv(data),
             "report.json": json.dumps(report.as_json(str(sweep_dir or out_dir)), indent=1,
                                       default=str) + "\n",
             "report.html": to_html(title, rows, report.verdicts, report.notes,
                                    report.plots, method=report.method)}
    for name, text in files.items():
        write_text_atomic(out_dir / name, text)
    report.files = [out_dir / name for name in files]
    return report


# --- wandb summary run -------------------------------------------------------------------------

WandbMode = Literal["online", "offline", "disabled", "shared"]  # wandb.init's modes
Columns = list[str | int]  # a wandb.Table's column names, as wandb types them


def log_to_wandb(report: Report, *, project: str, group: str, entity: str | None = None,
                 out_dir: Path | None = None) -> str:
    """The table (as numbers), the verdicts and the plots in one summary run of the sweep's
    group; returns its id."""
    import wandb  # heavy: only --wandb logs to it

    run = wandb.init(project=project, entity=entity, group=group, job_type="report",
                     # WANDB_MODE as set (a str): wandb.init checks it is one of its modes
                     name=f"report {group}", mode=cast("WandbMode", wandb_mode()),
                     dir=str(out_dir) if out_dir else None, reinit="finish_previous")
    try:
        cols = list(report.data[0]) if report.data else []
        verdicts = report.as_json("")["verdicts"]
        vcols = ["line", "kind", "outcome", "delta", "low", "high", "p", "p_adjusted", "test",
                 "n", "macs_ratio"]
        # wandb types columns list[str | int] where it only reads them: a list[str] serves
        run.log({"comparison": wandb.Table(columns=cast(Columns, cols),
                                           data=[[r[c] for c in cols] for r in report.data]),
                 "verdicts": wandb.Table(columns=cast(Columns, vcols),
                                         data=[[v[c] for c in vcols] for v in verdicts]),
                 **{f"plots/{p.stem}": wandb.Image(str(p)) for p in report.plots}})
        run.summary["verdicts"] = report.verdicts
        run.summary["baseline"] = report.answers.baseline_text()
        return run.id
    finally:
        run.finish()


# --- command line ------------------------------------------------------------------------------


DESCRIPTION = """\
Compare the runs of a sweep: which variant wins, by how much, at what cost,
and whether the difference is more than seed-to-seed noise.

Reads every run folder (summary.json, metrics.csv) under a sweep folder, or
the runs of a wandb project with --wandb-project. Prints a table with one row
per variant (runs that differ only by seed pooled into mean +- std) and its
difference to a baseline with a 95% confidence interval, then one verdict per
question: better, worse, no detectable difference, or too few seeds to tell.
Writes report.md, report.csv, report.json, report.html and plots/ into the
sweep folder (or --out)."""

EPILOG = """\
Examples:
caitlab-report outputs/demo
caitlab-report outputs/demo --baseline model=cait_tiny
caitlab-report outputs/residual_vs_depth --baseline residual=none --correction fdr_bh
caitlab-report --wandb-project me/caitlab --group demo --out reports/demo
Docs: "Console scripts" in the docs site (make docs; site/reference/cli.html)"""


def build_parser() -> argparse.ArgumentParser:
    """The ``caitlab-report`` command line (also read by the docs' CLI reference)."""
    parser = argparse.ArgumentParser(prog="caitlab-report", description=DESCRIPTION,
                                     epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, nargs="?", metavar="SWEEP_DIR",
                        help="the sweep folder to report on, e.g. outputs/demo (not needed "
                             "with --wandb-project)")
    parser.add_argument("--baseline", nargs="+", action="extend", default=[],
                        metavar="KEY=VALUE",
                        help="the variant every other one is compared with, named by the "
                             "values of the keys the sweep varies, e.g. --baseline "
                             "model=vit_tiny residual=none (default: the first value of each "
                             "varied key in the sweep's grid)")
    parser.add_argument("--correction", choices=list(CORRECTIONS), default="holm",
                        help="how the verdicts are corrected for being many: holm keeps the "
                             "chance of any wrong better/worse verdict under 5%%; fdr_bh "
                             "(Benjamini-Hochberg) keeps the expected share of wrong verdicts "
                             "under 5%%; none judges each verdict on its own at 5%% "
                             "(default: %(default)s)")
    parser.add_argument("--wandb-project", metavar="ENTITY/PROJECT",
                        help="read the runs from this wandb project instead of a folder "
                             "(default: none, read SWEEP_DIR)")
    parser.add_argument("--group", help="with --wandb-project: only the runs of this wandb "
                                        "group, i.e. one sweep (default: all groups)")
    parser.add_argument("--tag", action="append", default=[],
                        help="with --wandb-project: only the runs with this wandb tag; "
                             "repeat it to accept any of several tags (default: any tag)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="folder to write report.* and plots/ into (default: the sweep "
                             "folder; with --wandb-project, outputs/<group>, or "
                             "outputs/wandb_report without --group)")
    parser.add_argument("--by-commit", action="store_true",
                        help="one row per variant and version of the code (git commit) "
                             "instead of pooling runs made with different code (default: off)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the table, verdicts and plots to a summary run in "
                             "the sweep's wandb group (default: off)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def fail(message: str) -> int:
        print(f"caitlab-report: error: {message}", file=sys.stderr)
        return 2

    if args.wandb_project:
        import wandb  # heavy: only --wandb-project reads from it

        runs = runs_from_wandb(wandb.Api(), args.wandb_project, args.group, args.tag)
        out_dir = args.out or Path("outputs") / (args.group or "wandb_report")
        source = f"wandb {args.wandb_project} group={args.group} tags={args.tag}"
    elif args.sweep_dir is not None:
        if not args.sweep_dir.is_dir():
            return fail(f"{args.sweep_dir} is not a folder")
        runs = collect_runs(args.sweep_dir)
        for run in runs:
            if run.summary.get("status") == Status.UNREADABLE:
                # a folder whose record cannot be read says nothing a statistic may count
                print(f"caitlab-report: warning: {run.summary['error']}: not a readable "
                      "summary.json; left out of every table and verdict", file=sys.stderr)
        runs = [run for run in runs if run.summary.get("status") != Status.UNREADABLE]
        out_dir = args.out or args.sweep_dir
        source = str(args.sweep_dir)
    else:
        return fail("give a sweep folder or --wandb-project")
    if not runs:
        return fail(f"no runs in {source}")

    try:
        report = build_report(runs, out_dir, args.by_commit, args.baseline, args.sweep_dir,
                              title=f"caitlab report: {source}", correction=args.correction)
    except UserError as err:
        return fail(str(err))
    print(report.markdown())
    code = commits(runs)
    hours = device_hours(runs)
    cost = "" if hours is None else f", {hours:.3g} device-hours"
    print(f"\n{len(runs)} runs, {len(report.rows)} variants{cost}, code {', '.join(code[:4])}; "
          "written: " + ", ".join(str(p) for p in [*report.files, *report.plots]))
    warning = mixed_code_warning(runs)
    if warning:
        print(warning, file=sys.stderr)
    warning = selection_warning(runs, args.sweep_dir)
    if warning:
        print(warning, file=sys.stderr)
    if args.wandb:
        group = args.group or (runs[0].summary.get("name") or out_dir.name)
        project = (args.wandb_project or "caitlab").split("/")[-1]
        run_id = log_to_wandb(report, project=project, group=group, out_dir=out_dir)
        print(f"wandb: table, verdicts and plots logged to run {run_id} (group {group})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
