"""``caitlab-report``: a sweep folder -> one comparison table (Markdown and CSV).

One row per variant (runs that differ only by seed are grouped into mean +- std with their
count). Runs that are still going, failed or diverged stay in the table with their state.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AXES = ("model", "class_token", "ca_depth", "residual", "layerscale_init", "depth", "embed_dim")
METRICS = ("val/top1_best", "test/top1", "test/top5")


@dataclass
class Run:
    folder: Path
    summary: dict[str, Any]

    @property
    def state(self) -> str:
        status = self.summary.get("status", "pending")
        if status == "diverged":
            return f"diverged at epoch {self.summary.get('diverged_epoch', '?')}"
        return status


@dataclass
class Variant:
    key: str
    runs: list[Run] = field(default_factory=list)

    def axes(self) -> dict[str, Any]:
        return dict(self.runs[0].summary.get("axes") or {})


def collect_runs(sweep_dir: Path) -> list[Run]:
    """Every run folder below ``sweep_dir`` (one with a summary.json), sorted by path."""
    runs = []
    for path in sorted(Path(sweep_dir).rglob("summary.json")):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            summary = {"status": "unreadable"}
        runs.append(Run(path.parent, summary))
    return runs


def group_variants(runs: list[Run]) -> list[Variant]:
    variants: dict[str, Variant] = {}
    for run in runs:
        key = run.summary.get("variant") or run.summary.get("signature") or str(run.folder)
        variants.setdefault(key, Variant(key)).runs.append(run)
    return list(variants.values())


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return ""
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return (f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
            f" (n={len(values)})")


def _fmt_count(n: float | None, unit: float, digits: int = 2) -> str:
    return "" if n is None else f"{n / unit:.{digits}f}"


def variant_row(variant: Variant) -> dict[str, str]:
    axes = variant.axes()
    first = variant.runs[0].summary
    model = first.get("model") or {}
    completed = [r.summary for r in variant.runs if r.summary.get("status") == "completed"]
    row: dict[str, str] = {k: "" if axes.get(k) is None else str(axes.get(k)) for k in AXES}
    row["params (M)"] = _fmt_count(model.get("params"), 1e6)
    row["GMACs"] = _fmt_count(model.get("macs"), 1e9, 3)
    ips = [s["images_per_s"] for s in completed if s.get("images_per_s")]
    row["img/s"] = f"{statistics.mean(ips):.0f}" if ips else ""
    for metric in METRICS:
        row[metric] = _mean_std([s[metric] for s in completed if s.get(metric) is not None])
    epochs = [r.summary["epochs"] for r in variant.runs if r.summary.get("epochs")]
    row["epochs"] = str(max(epochs)) if epochs else ""
    walls = [r.summary.get("wall_s") for r in variant.runs if r.summary.get("wall_s")]
    row["wall (s)"] = f"{statistics.mean(walls):.0f}" if walls else ""
    states = sorted({r.state for r in variant.runs})
    row["state"] = ", ".join(states)
    row["runs"] = str(len(variant.runs))
    return row


def table_rows(sweep_dir: Path) -> list[dict[str, str]]:
    rows = [variant_row(v) for v in group_variants(collect_runs(sweep_dir))]
    return sorted(rows, key=lambda r: (r["model"], r["class_token"], r["residual"], r["depth"]))


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="caitlab-report", description=__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a sweep/experiment folder (outputs/<name>)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"caitlab-report: error: {args.sweep_dir} is not a folder", file=sys.stderr)
        return 2
    rows = table_rows(args.sweep_dir)
    if not rows:
        print(f"caitlab-report: error: no runs (summary.json) under {args.sweep_dir}",
              file=sys.stderr)
        return 2
    from caitlab.runs import write_text_atomic

    markdown = to_markdown(rows)
    write_text_atomic(args.sweep_dir / "report.md", markdown + "\n")
    write_text_atomic(args.sweep_dir / "report.csv", to_csv(rows))
    print(markdown)
    print(f"\nwritten: {args.sweep_dir / 'report.md'}, {args.sweep_dir / 'report.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
