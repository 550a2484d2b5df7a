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
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caitlab.provenance import commit_of

# caitlab's own architecture columns and the axes each one shows. A column stays when some
# run's model has one of its axes; a sweep of a project's own models only drops those it lacks.
ARCH_COLUMNS = (("model", ("model",)), ("class token", ("class_token", "insert_layer")),
                ("CA layers", ("ca_depth",)), ("residual", ("residual",)),
                ("eps", ("layerscale_init",)), ("depth", ("depth",)), ("width", ("embed_dim",)),
                ("attention", ("attention",)), ("token reorg", ("keep_rate", "reorg_layers")))
SHOWN_AXES = frozenset(axis for _, axes in ARCH_COLUMNS for axis in axes)
# Columns shown only when some variant sets them: (column, values that mean "not used").
OPTIONAL_COLUMNS = (("attention", ("", "standard")), ("token reorg", ("",)))
# The input's, not the model's choice (caitlab passes the data's): a column only when runs of
# one model differ in them.
DATA_AXES = frozenset({"in_chans", "num_classes", "img_size"})
METRICS = ("val/top1_best", "test/top1", "test/top5")
# wandb run states for runs whose summary never got a caitlab status
WANDB_STATES = {"finished": "completed", "running": "running", "crashed": "failed",
                "failed": "failed", "killed": "interrupted"}


@dataclass
class Run:
    name: str
    summary: dict[str, Any]
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, val/top1)
    folder: Path | None = None  # the run folder, for runs read from disk

    @property
    def status(self) -> str:
        return self.summary.get("status") or "pending"

    @property
    def state(self) -> str:
        if self.status == "diverged":
            return f"diverged at epoch {self.summary.get('diverged_epoch', '?')}"
        return self.status

    @property
    def axes(self) -> dict[str, Any]:
        return dict(self.summary.get("axes") or {})


@dataclass
class Variant:
    key: str
    runs: list[Run] = field(default_factory=list)

    @property
    def axes(self) -> dict[str, Any]:
        return self.runs[0].axes

    def completed(self) -> list[dict[str, Any]]:
        return [r.summary for r in self.runs if r.status == "completed"]

    def values(self, metric: str) -> list[float]:
        return [s[metric] for s in self.completed() if s.get(metric) is not None]

    @property
    def model_name(self) -> str:
        model = self.runs[0].summary.get("model") or {}
        return str(self.axes.get("model", model.get("name", "")))

    @property
    def own_model(self) -> bool:
        """A project's own model (its ``_target_`` outside caitlab), not one of caitlab's."""
        target = (self.runs[0].summary.get("model") or {}).get("target")
        return bool(target) and not str(target).startswith("caitlab.")

    @property
    def family(self) -> str:
        """CaiT-like (class attention), ViT-like, or a project's own model: the marker
        families of the plots."""
        if self.own_model:
            return "own"
        return "CaiT" if self.axes.get("class_token") == "class_attention" else "ViT"


# --- reading ---------------------------------------------------------------------------------


def _read_curve(metrics_csv: Path) -> list[tuple[int, float]]:
    if not metrics_csv.is_file():
        return []
    curve: dict[int, float] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("val/top1") and row.get("epoch"):
                curve[int(float(row["epoch"]))] = float(row["val/top1"])
    return sorted(curve.items())


def collect_runs(sweep_dir: Path) -> list[Run]:
    """Every run folder below ``sweep_dir`` (one with a summary.json), sorted by path."""
    runs = []
    for path in sorted(Path(sweep_dir).rglob("summary.json")):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            summary = {"status": "unreadable"}
        runs.append(Run(path.parent.name, summary, _read_curve(path.parent / "metrics.csv"),
                        folder=path.parent))
    return runs


def runs_from_wandb(api: Any, path: str, group: str | None = None,
                    tags: Iterable[str] = ()) -> list[Run]:
    """The same runs from wandb: ``api`` is a ``wandb.Api()``; ``path`` is entity/project."""
    filters: dict[str, Any] = {}
    if group:
        filters["group"] = group
    if tags:
        filters["tags"] = {"$in": list(tags)}
    runs = []
    for wrun in api.runs(path, filters=filters or None):
        summary = {k: v for k, v in dict(wrun.summary).items() if not k.startswith("_")}
        summary.setdefault("status", WANDB_STATES.get(getattr(wrun, "state", ""), "pending"))
        if "variant" not in summary:
            config = dict(wrun.config)
            config.pop("seed", None)
            summary["variant"] = json.dumps(config, sort_keys=True, default=str)
        curve = {}
        for row in wrun.scan_history(keys=["epoch", "val/top1"]):
            if row.get("val/top1") is not None and row.get("epoch") is not None:
                curve[int(row["epoch"])] = float(row["val/top1"])
        runs.append(Run(getattr(wrun, "name", wrun.id), summary, sorted(curve.items())))
    return runs


def group_variants(runs: list[Run], by_commit: bool = False) -> list[Variant]:
    """Runs that differ only by seed are one variant; ``by_commit``: and by the same code."""
    variants: dict[str, Variant] = {}
    for run in runs:
        key = run.summary.get("variant") or run.summary.get("signature") or run.name
        if by_commit:
            key = f"{key}@{commit_of(run.summary)}"
        variants.setdefault(key, Variant(key)).runs.append(run)
    return list(variants.values())


def commits(runs: Iterable[Run]) -> list[str]:
    """The code the runs come from (``provenance.commit_of``), most runs first; a run that
    does not say counts as ``unknown``."""
    counts: dict[str, int] = {}
    for run in runs:
        c = commit_of(run.summary) or "unknown"
        counts[c] = counts.get(c, 0) + 1
    return sorted(counts, key=lambda c: (-counts[c], c))


def mixed_code_warning(runs: list[Run]) -> str | None:
    found = commits(runs)
    if len(found) < 2:
        return None
    return (f"warning: these runs come from {len(found)} versions of the code "
            f"({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}): a difference may "
            "be the code's; --by-commit gives each its own rows")


# --- the table -------------------------------------------------------------------------------


def mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return ""
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return (f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
            f" (n={len(values)})")


def _count(n: float | None, unit: float, digits: int = 2) -> str:
    if n is None:
        return ""
    if 0 < n / unit < 10**-digits:  # a small CNN's 8e-05 GMACs is not 0.000
        return f"{n / unit:.1e}"
    return f"{n / unit:.{digits}f}"


def _placement(axes: dict[str, Any]) -> str:
    token = axes.get("class_token")
    if token == "insert":
        return f"insert@{axes.get('insert_layer')}"
    return "" if token is None else str(token)


def _token_reorg(axes: dict[str, Any]) -> str:
    """EViT's keep rate and layers, e.g. ``0.7 @ 1,2``; empty without reorganisation."""
    layers = axes.get("reorg_layers")
    if not layers or axes.get("keep_rate") is None:
        return ""
    return f"{axes['keep_rate']:g} @ {','.join(str(i) for i in layers)}"


def cell(value: Any) -> str:
    """An axis value as the table shows it (as typed in an override: ``true``, ``1e-05``)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(cell(v) for v in value)
    return str(value)


def extra_axes(variants: list[Variant]) -> list[str]:
    """The axes beyond caitlab's architecture columns that the table shows, in first-seen
    order: those in which runs of one model differ (what the sweep varied, e.g.
    ``model.mlp_ratio=2,4``), and every argument of a project's own model (``channels``,
    ``kernel_size``...; not the data's ``in_chans``/``num_classes``). What merely tells one of
    caitlab's models from another (vit_tiny's talking_heads=false) stays in the model name."""
    keys = list(dict.fromkeys(k for v in variants for k in v.axes
                              if k not in SHOWN_AXES))
    shown = []
    for key in keys:
        values: dict[str, set[str]] = {}
        for v in variants:
            if key in v.axes:
                values.setdefault(v.model_name, set()).add(
                    json.dumps(v.axes[key], sort_keys=True, default=str))
        varied = any(len(vals) > 1 for vals in values.values())
        own = key not in DATA_AXES and any(v.own_model and key in v.axes for v in variants)
        if varied or own:
            shown.append(key)
    return shown


def _arch_cells(axes: dict[str, Any], model: dict[str, Any]) -> dict[str, str]:
    return {
        "model": str(axes.get("model", model.get("name", ""))),
        "class token": _placement(axes),
        "CA layers": str(axes.get("ca_depth") or ""),
        "residual": cell(axes.get("residual")),
        "eps": "" if axes.get("layerscale_init") is None else f"{axes['layerscale_init']:g}",
        "depth": cell(axes.get("depth")),
        "width": cell(axes.get("embed_dim")),
        "attention": str(axes.get("attention") or ""),
        "token reorg": _token_reorg(axes),
    }


def _result_cells(variant: Variant) -> dict[str, str]:
    model = variant.runs[0].summary.get("model") or {}
    row = {"params (M)": _count(model.get("params"), 1e6),
           "GMACs": _count(model.get("macs"), 1e9, 3)}
    ips = [s["images_per_s"] for s in variant.completed() if s.get("images_per_s")]
    row["img/s"] = f"{statistics.mean(ips):.0f}" if ips else ""
    row["val top-1 (best)"] = mean_std(variant.values("val/top1_best"))
    row["test top-1"] = mean_std(variant.values("test/top1"))
    row["test top-5"] = mean_std(variant.values("test/top5"))
    epochs = [r.summary["epochs"] for r in variant.runs if r.summary.get("epochs")]
    row["epochs"] = str(max(epochs)) if epochs else ""
    walls = [r.summary["wall_s"] for r in variant.runs if r.summary.get("wall_s")]
    row["wall (s)"] = f"{statistics.mean(walls):.0f}" if walls else ""
    states: dict[str, int] = {}
    for r in variant.runs:
        states[r.state] = states.get(r.state, 0) + 1
    row["state"] = ", ".join(s if n == 1 else f"{n} {s}" for s, n in sorted(states.items()))
    row["runs"] = str(len(variant.runs))
    row["code"] = ", ".join(commits(variant.runs))
    return row


def _order(value: Any) -> tuple:
    """Sorts numbers by value and anything else by its text, None first."""
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "")
    return (2, 0.0, cell(value))


def _sort_key(variant: Variant, extra: Iterable[str] = ()):
    a = variant.axes
    return (str(a.get("model", "")), str(a.get("class_token", "")), str(a.get("residual", "")),
            _order(a.get("depth")), _order(a.get("embed_dim")), str(a.get("attention") or ""),
            -(a.get("keep_rate") or 1.0), *(_order(a.get(k)) for k in extra))


def table_rows(variants: list[Variant]) -> list[dict[str, str]]:
    """One row per variant. Columns: caitlab's architecture columns (those some run's model
    has an axis of; attention and token reorg only when used), every other model-config axis
    the runs differ in or that a project's own model takes (:func:`extra_axes`), then cost,
    accuracy and state."""
    extra = extra_axes(variants)
    ordered = sorted(variants, key=lambda v: _sort_key(v, extra))
    arch = [_arch_cells(v.axes, v.runs[0].summary.get("model") or {}) for v in ordered]
    columns = [c for c, axes in ARCH_COLUMNS
               if c == "model" or any(k in v.axes for v in ordered for k in axes)]
    for column, unused in OPTIONAL_COLUMNS:  # keep tables of other sweeps as they were
        if column in columns and all(cells[column] in unused for cells in arch):
            columns.remove(column)
    # a project's axis named like one of caitlab's columns (its own "width") keeps its meaning
    headers = {key: f"model.{key}" if key in columns else key for key in extra}
    rows = []
    for variant, cells in zip(ordered, arch, strict=True):
        row = {c: cells[c] for c in columns}
        row.update({headers[k]: cell(variant.axes.get(k)) for k in extra})
        row.update(_result_cells(variant))
        rows.append(row)
    return rows


def to_markdown(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no runs)"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(row[c] for c in cols) + " |" for row in rows]
    return "\n".join(lines)


def to_csv(rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


# --- the plots -------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean(values: list[float]) -> float:
    return statistics.mean(values) if values else math.nan


def plot_top1_vs_depth(variants: list[Variant], path: Path) -> Path | None:
    """One line per residual scaling: the paper's Table 1 as a picture."""
    points: dict[str, list[tuple[int, float, float]]] = {}
    for v in variants:
        top1 = [x * 100 for x in v.values("test/top1")]
        if top1 and v.axes.get("depth") is not None:
            std = statistics.stdev(top1) if len(top1) > 1 else 0.0
            # a project's own model (no residual axis) gets a line of its own
            points.setdefault(str(v.axes.get("residual") or v.model_name), []).append(
                (v.axes["depth"], _mean(top1), std))
    if not points or len({d for pts in points.values() for d, _, _ in pts}) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for residual, pts in sorted(points.items()):
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    marker="o", capsize=3, label=residual)
    ax.set_xlabel("depth (self-attention layers)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("top-1 vs depth by residual scaling")
    ax.grid(alpha=0.3)
    ax.legend(title="residual")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_top1_vs_cost(variants: list[Variant], path: Path, cost: str,
                      extra: Iterable[str] = ()) -> Path | None:
    """Top-1 against MACs (``cost='macs'``) or images/s (``'images_per_s'``), ViT vs CaiT
    (vs a project's own models); points labelled by :func:`variant_label` with ``extra``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for family, marker in (("ViT", "o"), ("CaiT", "^"), ("own", "s")):
        xs, ys, labels = [], [], []
        for v in variants:
            top1 = v.values("test/top1")
            if v.family != family or not top1:
                continue
            if cost == "macs":
                x = (v.runs[0].summary.get("model") or {}).get("macs")
                x = None if x is None else x / 1e6  # in G or M below, whichever reads
            else:
                x = _mean([s["images_per_s"] for s in v.completed() if s.get("images_per_s")])
            if x is None or math.isnan(x):
                continue
            xs.append(x)
            ys.append(_mean(top1) * 100)
            labels.append(variant_label(v, extra))
        if xs:
            drawn += len(xs)
            ax.scatter(xs, ys, marker=marker, s=60,
                       label="own models" if family == "own" else family)
            for x, y, label in zip(xs, ys, labels, strict=True):
                ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("training images/s")
    if cost == "macs":
        xs = [x for c in ax.collections for x in c.get_offsets()[:, 0]]
        giga = max(xs) >= 1000
        if giga:  # the points were drawn in MMACs
            for c in ax.collections:
                c.set_offsets(c.get_offsets() / [1000, 1])
            for t in ax.texts:
                t.xy = (t.xy[0] / 1000, t.xy[1])
            xs = [x / 1000 for x in xs]
        ax.set_xlabel(f"{'G' if giga else 'M'}MACs per image")
        if max(xs) > 4 * min(xs):  # a log axis only where the costs span a range
            ax.set_xscale("log")
    ax.margins(x=0.2, y=0.1)
    lo, hi = ax.get_xlim()
    log = ax.get_xscale() == "log"
    mid = math.sqrt(lo * hi) if log else (lo + hi) / 2
    for t in ax.texts:  # labels of points on the right run leftwards, inside the axes
        if t.xy[0] > mid:
            t.set_horizontalalignment("right")
            t.xyann = (-3, 3)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"top-1 vs {'MACs' if cost == 'macs' else 'throughput'}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_val_curves(runs: list[Run], path: Path, extra: Iterable[str] = ()) -> Path | None:
    curves = [r for r in runs if r.curve]
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in curves:
        ax.plot([e + 1 for e, _ in run.curve], [t * 100 for _, t in run.curve],
                label=f"{variant_label(Variant('', [run]), extra)} ({run.name[:6]})",
                linewidth=1.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("validation curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2 if len(curves) > 8 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def variant_label(variant: Variant, extra: Iterable[str] = ()) -> str:
    """A short name for plots: the model and its architecture, plus ``key=value`` of each
    ``extra`` axis (:func:`extra_axes`) the variant has."""
    a = variant.axes
    parts = [str(a.get("model", "?")), _placement(a), cell(a.get("residual"))]
    if a.get("depth") is not None:
        parts.append(f"d{a['depth']}")
    if a.get("attention") not in (None, "standard"):
        parts.append(str(a["attention"]).replace("_", "-"))
    if _token_reorg(a):
        parts.append(f"keep {a['keep_rate']:g}")
    parts += [f"{k}={cell(a[k])}" for k in extra if k in a]
    return " ".join(p for p in parts if p)


def write_plots(runs: list[Run], variants: list[Variant], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = extra_axes(variants)
    made = [
        plot_top1_vs_depth(variants, out_dir / "top1_vs_depth.png"),
        plot_top1_vs_cost(variants, out_dir / "top1_vs_macs.png", "macs", extra),
        plot_top1_vs_cost(variants, out_dir / "top1_vs_throughput.png", "images_per_s", extra),
        plot_val_curves(runs, out_dir / "val_curves.png", extra),
    ]
    return [p for p in made if p is not None]


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
    print(f"\n{len(runs)} runs, {len(rows)} variants, code {', '.join(code[:4])}; written: "
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
