"""``caitlab-report``: a sweep -> which variant wins, by how much, at what cost.

Reads a sweep folder (every ``summary.json`` and ``metrics.csv`` below it) or a wandb project
(``--wandb-project``, through ``wandb.Api().runs``), and writes next to the sweep, and prints:

- a table (Markdown and CSV), one row per variant; runs that differ only by seed are grouped
  into mean ± std with their count; runs in progress, failed or diverged keep their state;
- plots (PNG): test top-1 vs depth with one line per residual scaling (paper Table 1 as a
  picture), top-1 vs MACs and vs images/s with ViT-like and CaiT-like variants as two marker
  families, and the validation curve of every run;
- with ``--wandb``, the table as a ``wandb.Table`` and the plots as images in a summary run of
  the group.

The runs and variants are :mod:`report_runs`, the table :mod:`report_table` (its architecture
columns read from :mod:`caitlab.models.axes`), the plots :mod:`report_plots`. Stdlib only at
import: caitlab-sweep reads runs through it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from caitlab.analysis.report_plots import write_plots
from caitlab.analysis.report_runs import (
    Run,
    Variant,
    collect_runs,
    commits,
    group_variants,
    mixed_code_warning,
    runs_from_wandb,
)
from caitlab.analysis.report_table import (
    cell,
    device_hours,
    extra_axes,
    table_rows,
    to_csv,
    to_markdown,
    variant_label,
)

__all__ = ["Run", "Variant", "build_report", "cell", "collect_runs", "commits", "extra_axes",
           "group_variants", "log_to_wandb", "main", "mixed_code_warning", "runs_from_wandb",
           "table_rows", "to_csv", "to_markdown", "variant_label", "write_plots"]


# --- wandb summary run -------------------------------------------------------------------------


def log_to_wandb(rows: list[dict[str, str]], plots: list[Path], *, project: str,
                 group: str, entity: str | None = None, out_dir: Path | None = None) -> str:
    """The table and plots in one summary run of the sweep's group; returns its id."""
    import wandb

    from caitlab.training.tracking import wandb_mode

    run = wandb.init(project=project, entity=entity, group=group, job_type="report",
                     name=f"report {group}", mode=wandb_mode(),
                     dir=str(out_dir) if out_dir else None, reinit="finish_previous")
    try:
        cols = list(rows[0]) if rows else []
        run.log({"comparison": wandb.Table(columns=cols, data=[[r[c] for c in cols]
                                                                 for r in rows]),
                 **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}})
        return run.id
    finally:
        run.finish()


# --- command line ------------------------------------------------------------------------------


def build_report(runs: list[Run], out_dir: Path, by_commit: bool = False
                 ) -> tuple[list[dict[str, str]], list[Path]]:
    from caitlab.runs import write_text_atomic

    variants = group_variants(runs, by_commit)
    rows = table_rows(variants)
    if len(commits(runs)) < 2 and not by_commit:  # one version of the code: said once, below
        for row in rows:
            row.pop("code")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "report.md", to_markdown(rows) + "\n")
    write_text_atomic(out_dir / "report.csv", to_csv(rows))
    plots = write_plots(runs, variants, out_dir / "plots")
    return rows, plots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="caitlab-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, nargs="?",
                        help="a sweep/experiment folder (outputs/<name>)")
    parser.add_argument("--wandb-project", help="read runs from wandb: entity/project")
    parser.add_argument("--group", help="with --wandb-project: the sweep's wandb group")
    parser.add_argument("--tag", action="append", default=[], help="with --wandb-project")
    parser.add_argument("--out", type=Path, help="where to write (default: the sweep folder)")
    parser.add_argument("--by-commit", action="store_true",
                        help="one row per variant and version of the code (git commit)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the table and plots to a wandb summary run")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"caitlab-report: error: {message}", file=sys.stderr)
        return 2

    if args.wandb_project:
        import wandb

        runs = runs_from_wandb(wandb.Api(), args.wandb_project, args.group, args.tag)
        out_dir = args.out or Path("outputs") / (args.group or "wandb_report")
        source = f"wandb {args.wandb_project} group={args.group} tags={args.tag}"
    elif args.sweep_dir is not None:
        if not args.sweep_dir.is_dir():
            return fail(f"{args.sweep_dir} is not a folder")
        runs = collect_runs(args.sweep_dir)
        out_dir = args.out or args.sweep_dir
        source = str(args.sweep_dir)
    else:
        return fail("give a sweep folder or --wandb-project")
    if not runs:
        return fail(f"no runs in {source}")

    rows, plots = build_report(runs, out_dir, args.by_commit)
    print(to_markdown(rows))
    code = commits(runs)
    hours = device_hours(runs)
    cost = "" if hours is None else f", {hours:.3g} device-hours"
    print(f"\n{len(runs)} runs, {len(rows)} variants{cost}, code {', '.join(code[:4])}; written: "
          f"{out_dir / 'report.md'}, {out_dir / 'report.csv'}" + "".join(f", {p}" for p in plots))
    warning = mixed_code_warning(runs)
    if warning:
        print(warning, file=sys.stderr)
    if args.wandb:
        group = args.group or (runs[0].summary.get("name") or out_dir.name)
        project = (args.wandb_project or "caitlab").split("/")[-1]
        run_id = log_to_wandb(rows, plots, project=project, group=group, out_dir=out_dir)
        print(f"wandb: table and plots logged to run {run_id} (group {group})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
