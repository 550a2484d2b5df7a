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

from caitlab.analysis.report_answers import Answers
from caitlab.analysis.report_runs import Variant, commits
from caitlab.analysis.report_verdicts import format_p, number, sign_digits
from caitlab.analysis.stats import MIN_SEEDS, Estimate, estimate
from caitlab.models import axes as declared  # stdlib only: the package loads torch lazily
from caitlab.record.sweep import device_hours


def cell(value: Any) -> str:
    """An axis value as the table shows it (as typed in an override: ``true``, ``1e-05``)."""
    return declared.text(value)


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


def _hours(hours: float | None) -> str:
    return "" if hours is None else f"{hours:.3g}"


def _estimate_fields(prefix: str, e: Estimate | None, interval: bool) -> dict[str, Any]:
    fields = {f"{prefix}_mean": e and e.mean, f"{prefix}_std": e and e.std,
              f"{prefix}_n": e.n if e else 0}
    if interval:
        fields.update({f"{prefix}_ci_low": e and e.low, f"{prefix}_ci_high": e and e.high})
    return fields


def result_numbers(variant: Variant, answers: Answers | None = None) -> dict[str, Any]:
    """The variant's results as numbers (None where unknown): cost, accuracy in points with
    its spread and interval over seeds, its difference to the baseline, and its state."""
    model = variant.runs[0].summary.get("model") or {}
    row: dict[str, Any] = {"params": model.get("params"), "macs": variant.macs,
                           "images_per_s": variant.images_per_s}
    for prefix, metric, full in (("val_top1_best", "val/top1_best", False),
                                 ("test_top1", "test/top1", True),
                                 ("test_top5", "test/top5", False)):
        row.update(_estimate_fields(prefix, estimate([100 * x for x in variant.values(metric)]),
                                    full))
    if answers is not None and answers.baseline_keys:
        d = answers.differences.get(variant.key)
        row.update({"delta_of": answers.metric, "delta": d and d.delta,
                    "delta_ci_low": d and d.low, "delta_ci_high": d and d.high,
                    "p": d and d.p,
                    "comparison": "baseline" if variant.key in answers.baseline_keys
                    else (d.test if d else None)})
    if answers is not None and answers.fronts:
        for cost in ("macs", "images_per_s"):
            row[f"pareto_{cost}"] = variant.key in answers.fronts.get(cost, ())
    epochs = [r.summary["epochs"] for r in variant.runs if r.summary.get("epochs")]
    walls = [r.summary["wall_s"] for r in variant.runs if r.summary.get("wall_s")]
    states: dict[str, int] = {}
    for r in variant.runs:
        states[r.state] = states.get(r.state, 0) + 1
    row.update({"epochs": max(epochs) if epochs else None,
                "wall_s": statistics.fmean(walls) if walls else None,
                "device_hours": device_hours(variant.runs),
                "state": ", ".join(s if n == 1 else f"{n} {s}"
                                   for s, n in sorted(states.items())),
                "runs": len(variant.runs), "code": ", ".join(commits(variant.runs))})
    return row


def _spread(n: dict[str, Any], prefix: str) -> str:
    """``mean ± std (n=k)`` in points; the mean alone for one run."""
    mean, std = n[f"{prefix}_mean"], n[f"{prefix}_std"]
    if mean is None:
        return ""
    if std is None:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f} (n={n[f'{prefix}_n']})"


def delta_cell(n: dict[str, Any]) -> str:
    if n.get("comparison") == "baseline":
        return "baseline"
    if n.get("delta") is None:
        return ""
    if n["p"] is None:
        return f"{n['delta']:+.2f} (n<{MIN_SEEDS})"
    if n["delta_ci_low"] is None:  # too few pairs for a 95% interval, or no spread to size one
        return f"{n['delta']:+.2f} (no 95% CI)"
    low, high = n["delta_ci_low"], n["delta_ci_high"]
    digits = sign_digits(low, high, digits=2)
    return (f"{number(n['delta'], digits, sign=True)} [{number(low, digits, sign=True)}, "
            f"{number(high, digits, sign=True)}]")


def _result_cells(n: dict[str, Any]) -> dict[str, str]:
    """:func:`result_numbers` as the table shows them."""
    row = {"params (M)": _count(n["params"], 1e6), "GMACs": _count(n["macs"], 1e9, 3),
           "img/s": "" if n["images_per_s"] is None else f"{n['images_per_s']:.0f}",
           "test top-1": _spread(n, "test_top1")}
    if "delta_of" in n:  # the answer beside the accuracy it is about
        row["Δ top-1 [95% CI]"] = delta_cell(n)
        row["p"] = format_p(n["p"]).removeprefix("p=")
    if "pareto_macs" in n:
        row["Pareto"] = ", ".join(name for cost, name in (("macs", "MACs"),
                                                          ("images_per_s", "img/s"))
                                  if n.get(f"pareto_{cost}"))
    row.update({"test top-5": _spread(n, "test_top5"),
                "val top-1 (best)": _spread(n, "val_top1_best"),
                "epochs": "" if n["epochs"] is None else str(n["epochs"]),
                "wall (s)": "" if n["wall_s"] is None else f"{n['wall_s']:.0f}",
                "device-h": _hours(n["device_hours"]), "state": n["state"],
                "runs": str(n["runs"]), "code": n["code"]})
    return row


def _sort_key(variant: Variant, extra: Iterable[str] = ()) -> tuple:
    a = variant.axes
    return (*(axis.rank(a) for axis in declared.ARCHITECTURE if axis.sort),
            *(declared.rank(a.get(k)) for k in extra))


def ordered(variants: list[Variant]) -> list[Variant]:
    """The table's order: a chain's stages in order, then by the architecture axes' ranks,
    then the extra axes'."""
    extra = extra_axes(variants)
    return sorted(variants, key=lambda v: (v.stage_index, _sort_key(v, extra),
                                           _distillation_rank(v)))


def _description(variants: list[Variant]) -> list[tuple[Variant, dict[str, str]]]:
    """Each variant (in the table's order) with its architecture and extra-axis cells."""
    extra = extra_axes(variants)
    ordered_ = ordered(variants)
    arch = [_arch_cells(v) for v in ordered_]
    columns = _arch_columns(ordered_, arch)
    # a project's axis named like one of caitlab's columns (its own "width") keeps its meaning
    headers = {key: f"model.{key}" if key in columns else key for key in extra}
    distilled = any(v.runs[0].summary.get("teacher") for v in ordered_)
    chain = any(v.stage is not None for v in ordered_)
    inits = any(_init_cell(v) for v in ordered_)
    out = []
    for variant, cells in zip(ordered_, arch, strict=True):
        row = {"stage": variant.stage or ""} if chain else {}
        row.update({c: cells[c] for c in columns})
        row.update({headers[k]: cell(variant.axes.get(k)) for k in extra})
        if distilled:
            row.update(_distillation_cells(variant))
        if inits:
            row["init"] = _init_cell(variant)
        out.append((variant, row))
    return out


def _init_cell(variant: Variant) -> str:
    """The weights a fine-tune started from: an earlier stage of its chain (``pretrain
    9994181678``), or the checkpoint ``finetune_from`` names; empty for a run from scratch."""
    summary = variant.runs[0].summary
    up = (summary.get("upstream") or {}).get("finetune_from")
    if up:
        return f"{up.get('stage')} {up.get('signature')}"
    for line in summary.get("overrides") or []:
        key, _, value = str(line).lstrip("+").partition("=")
        if key == "finetune_from" and value not in ("", "null"):
            return value
    return ""


def _distillation_cells(variant: Variant) -> dict[str, str]:
    """The distillation a variant trained with (``hard``, ``soft τ=2``; α where it is not
    DeiT's 0.5) and its teacher, for sweeps where some variant has one."""
    t = variant.runs[0].summary.get("teacher") or {}
    if not t:
        return {"distillation": "none", "teacher": ""}
    kind = str(t.get("type", ""))
    if kind == "soft" and t.get("tau") not in (None, 1.0):
        kind += f" τ={t['tau']:g}"
    if t.get("alpha") not in (None, 0.5):
        kind += f" α={t['alpha']:g}"
    return {"distillation": kind, "teacher": str(t.get("name") or t.get("source", ""))}


def tables(variants: list[Variant], answers: Answers | None = None
           ) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """The table as shown (:func:`table_rows`) and as data (:func:`data_rows`), from one
    pass over the variants."""
    rows, data = [], []
    for variant, description in _description(variants):
        numbers = result_numbers(variant, answers)
        rows.append({**description, **_result_cells(numbers)})
        data.append({**description, **numbers})
    return rows, data


def data_rows(variants: list[Variant], answers: Answers | None = None) -> list[dict[str, Any]]:
    """The table as data (``report.csv``, ``report.json``): the description columns, then
    every result in a column of its own, as a number."""
    return tables(variants, answers)[1]


def table_rows(variants: list[Variant], answers: Answers | None = None
               ) -> list[dict[str, str]]:
    """One row per variant. Columns: caitlab's architecture columns (those some run's model
    has an axis of; attention and token reorg only when used), every other model-config axis
    the runs differ in or that a project's own model takes (:func:`extra_axes`), then cost,
    accuracy and state; with ``answers``, each variant's difference to the baseline."""
    return tables(variants, answers)[0]


def variant_label(variant: Variant, extra: Iterable[str] = ()) -> str:
    """A short name for plots: the model and its architecture, plus ``key=value`` of each
    ``extra`` axis (:func:`extra_axes`) the variant has."""
    a = variant.axes
    parts = [axis.part(a) for axis in declared.ARCHITECTURE]
    parts += [f"{k}={cell(a[k])}" for k in extra if k in a]
    if _distilled(variant):
        parts.append(f"distil {_distillation_cells(variant)['distillation']}")
    label = " ".join(p for p in parts if p)
    return f"{variant.stage}: {label}" if variant.stage else label


def _distilled(variant: Variant) -> bool:
    """Whether the variant was asked for a distillation (``distillation=none`` included)."""
    summary = variant.runs[0].summary
    return bool(summary.get("teacher")) or any(
        str(o).startswith("distillation=") for o in summary.get("overrides") or [])


DISTILLATION_ORDER = ("none", "soft", "hard")


def _distillation_rank(variant: Variant) -> int:
    kind = str((variant.runs[0].summary.get("teacher") or {}).get("type", "none"))
    return DISTILLATION_ORDER.index(kind) if kind in DISTILLATION_ORDER else len(
        DISTILLATION_ORDER)


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
