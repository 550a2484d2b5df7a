"""The report's table: one row per variant, its columns and order read from the declared
architecture axes (:mod:`caitlab.models.axes`), then cost, accuracy and state; and the short
name plots give a variant."""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Iterable
from typing import Any

from caitlab.analysis.report_runs import Variant, commits
from caitlab.models import axes as declared  # stdlib only: the package loads torch lazily


def cell(value: Any) -> str:
    """An axis value as the table shows it (as typed in an override: ``true``, ``1e-05``)."""
    return declared.text(value)


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


def extra_axes(variants: list[Variant]) -> list[str]:
    """The axes beyond caitlab's architecture columns that the table shows, in first-seen
    order: those in which runs of one model differ (what the sweep varied, e.g.
    ``model.mlp_ratio=2,4``), and every argument of a project's own model (``channels``,
    ``kernel_size``...; not the data's ``in_chans``/``num_classes``). What merely tells one of
    caitlab's models from another (vit_tiny's talking_heads=false) stays in the model name."""
    keys = list(dict.fromkeys(k for v in variants for k in v.axes
                              if k not in declared.ARCHITECTURE_KEYS))
    shown = []
    for key in keys:
        values: dict[str, set[str]] = {}
        for v in variants:
            if key in v.axes:
                values.setdefault(v.model_name, set()).add(
                    json.dumps(v.axes[key], sort_keys=True, default=str))
        varied = any(len(vals) > 1 for vals in values.values())
        own = key not in declared.INPUT_KEYS and any(v.own_model and key in v.axes
                                                     for v in variants)
        if varied or own:
            shown.append(key)
    return shown


def _arch_cells(variant: Variant) -> dict[str, str]:
    # the model column names a run without axes by its summary's model
    axes = {**variant.axes, "model": variant.model_name}
    return {axis.column: axis.shown(axes) for axis in declared.ARCHITECTURE}


def _arch_columns(variants: list[Variant], cells: list[dict[str, str]]) -> list[str]:
    """The architecture columns some variant has an axis of, less those no variant uses
    (attention, token reorg: the tables of sweeps that do not vary them stay as they were)."""
    columns = []
    for axis in declared.ARCHITECTURE:
        has = axis.always or any(k in v.axes for v in variants for k in axis.keys)
        if has and not (axis.unused and all(c[axis.column] in axis.unused for c in cells)):
            columns.append(axis.column)
    return columns


def device_hours(runs: Iterable[Any]) -> float | None:
    """Device-hours of ``runs`` (wall x devices over every attempt: seeds and reruns count),
    None when no run recorded them (runs written before caitlab did)."""
    hours = [r.summary["device_hours"] for r in runs
             if isinstance(r.summary.get("device_hours"), (int, float))]
    return sum(hours) if hours else None


def _hours(hours: float | None) -> str:
    return "" if hours is None else f"{hours:.3g}"


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
    row["device-h"] = _hours(device_hours(variant.runs))
    states: dict[str, int] = {}
    for r in variant.runs:
        states[r.state] = states.get(r.state, 0) + 1
    row["state"] = ", ".join(s if n == 1 else f"{n} {s}" for s, n in sorted(states.items()))
    row["runs"] = str(len(variant.runs))
    row["code"] = ", ".join(commits(variant.runs))
    return row


def _sort_key(variant: Variant, extra: Iterable[str] = ()) -> tuple:
    a = variant.axes
    return (*(axis.rank(a) for axis in declared.ARCHITECTURE if axis.sort),
            *(declared.rank(a.get(k)) for k in extra))


def table_rows(variants: list[Variant]) -> list[dict[str, str]]:
    """One row per variant. Columns: caitlab's architecture columns (those some run's model
    has an axis of; attention and token reorg only when used), every other model-config axis
    the runs differ in or that a project's own model takes (:func:`extra_axes`), then cost,
    accuracy and state."""
    extra = extra_axes(variants)
    ordered = sorted(variants, key=lambda v: _sort_key(v, extra))
    arch = [_arch_cells(v) for v in ordered]
    columns = _arch_columns(ordered, arch)
    # a project's axis named like one of caitlab's columns (its own "width") keeps its meaning
    headers = {key: f"model.{key}" if key in columns else key for key in extra}
    rows = []
    for variant, cells in zip(ordered, arch, strict=True):
        row = {c: cells[c] for c in columns}
        row.update({headers[k]: cell(variant.axes.get(k)) for k in extra})
        row.update(_result_cells(variant))
        rows.append(row)
    return rows


def variant_label(variant: Variant, extra: Iterable[str] = ()) -> str:
    """A short name for plots: the model and its architecture, plus ``key=value`` of each
    ``extra`` axis (:func:`extra_axes`) the variant has."""
    a = variant.axes
    parts = [axis.part(a) for axis in declared.ARCHITECTURE]
    parts += [f"{k}={cell(a[k])}" for k in extra if k in a]
    return " ".join(p for p in parts if p)


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
