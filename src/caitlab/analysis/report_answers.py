"""The report's answers: what the sweep varied (its grid), the baseline every variant is
compared with, each variant's difference to it, and a verdict per question: one axis changed,
everything else held where the grid has both.

The grid is read from the runs' own overrides (``model=cait_tiny model/residual=layerscale``:
what the researcher asked for, as typed), its order from the sweep's ``multirun.yaml``; runs
that do not record overrides fall back to their architecture axes.
"""

from __future__ import annotations

import difflib
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from caitlab import stages
from caitlab.analysis.report_runs import Variant
from caitlab.analysis.report_verdicts import (
    DEFAULT,
    Verdict,
    apply_correction,
    compare,
    shown,
)
from caitlab.analysis.report_verdicts import few_seeds_note as _few_seeds_note
from caitlab.analysis.stats import Difference, difference, pareto_front
from caitlab.errors import UserError
from caitlab.models import axes as declared
from caitlab.record.sweep import ORDER_FILE, Run, order_of
from caitlab.status import Status

METRICS = ("test/top1", "val/top1_best")  # the first that some run has is the answer's


def metric_of(variants: Iterable[Variant]) -> str:
    variants = list(variants)
    for metric in METRICS:
        if any(v.values(metric) for v in variants):
            return metric
    return METRICS[0]


def metric_name(metric: str) -> str:
    return {"test/top1": "test top-1", "val/top1_best": "best val top-1"}.get(metric, metric)


def by_seed(variant: Variant, metric: str) -> dict[Any, float]:
    """Seed -> the metric in points (top-1 100 = every image right), completed runs with a
    finite value only."""
    out = {}
    for run in variant.runs:
        value = run.summary.get(metric)
        if run.status == Status.COMPLETED and isinstance(value, (int, float)) \
                and math.isfinite(value):
            out[run.summary.get("seed", run.name)] = 100.0 * value
    return out


# --- the grid: what the sweep varied --------------------------------------------------------


def _override_settings(run: Run) -> dict[str, str] | None:
    from caitlab.identity import (  # Hydra, OmegaConf: kept off caitlab-sweep
        DEFAULT_EXCLUDE,
        excluded,
    )

    overrides = run.summary.get("overrides")
    if not isinstance(overrides, list):
        return None
    out = {}
    for line in overrides:
        key, sep, value = str(line).lstrip("+").partition("=")
        # a chain's stage is a column of its own, and its reference to an upstream run is
        # what it is in every run of the stage
        if sep and not key.startswith("~") and key not in ("seed", "stage") \
                and stages.parse(value) is None \
                and not excluded(key.replace("/", "."), DEFAULT_EXCLUDE):
            out[key] = value
    return out


def _axis_settings(variant: Variant) -> dict[str, str]:
    return {k: declared.text(v) for k, v in variant.axes.items()}


def settings(variant: Variant) -> dict[str, str]:
    """What the variant's runs were asked for, seed aside: the overrides all its runs share
    (falling back to its axes for runs that do not record their overrides)."""
    found = [s for r in variant.runs if (s := _override_settings(r)) is not None]
    if not found or len(found) < len(variant.runs):  # a run without its overrides
        return _axis_settings(variant)
    first = found[0]
    return {k: v for k, v in first.items() if all(s.get(k) == v for s in found[1:])}


@dataclass
class Grid:
    keys: list[str]                       # the varied keys, in the order the grid names them
    values: dict[str, list[str]]          # key -> its values, grid order first
    points: dict[str, dict[str, str]]     # variant key -> its value of every varied key

    def first(self) -> dict[str, str]:
        return {k: self.values[k][0] for k in self.keys}


def _sweep_order(sweep_dir: Path | None) -> tuple[dict[str, list[str]], bool]:
    """(key -> values in the grid's order, whether that order was recorded at the sweep's
    first launch). The record (``sweep_order.yaml``, :mod:`caitlab.sweeps.order`) is never
    reordered by a re-launch; ``multirun.yaml`` is the last launch's, which may list the
    values in another order or only some of the keys."""
    if sweep_dir is None:
        return {}, False
    try:
        import yaml  # kept off caitlab-sweep, which reads no sweep's order

        recorded = Path(sweep_dir) / ORDER_FILE
        if recorded.is_file():
            order = yaml.safe_load(recorded.read_text()) or {}
            return {str(k): [str(x) for x in v] for k, v in order.items()}, True
        path = Path(sweep_dir) / "multirun.yaml"
        if path.is_file():
            return order_of(yaml.safe_load(path.read_text()) or {}), False
    except Exception:  # an unreadable or foreign record: the table's order serves
        pass
    return {}, False


def grid(variants: list[Variant], sweep_dir: Path | None = None) -> Grid:
    """``variants`` in the table's order; the keys whose values differ between them."""
    per = {v.key: settings(v) for v in variants}
    keys = list(dict.fromkeys(k for s in per.values() for k in s))
    varied = [k for k in keys if len({s.get(k, DEFAULT) for s in per.values()}) > 1]
    if not all(_override_settings(r) is not None for v in variants for r in v.runs):
        varied = _independent(variants, varied)
    order, recorded = _sweep_order(sweep_dir)
    if not recorded and not all(k in order for k in varied):
        # the last launch listed only some keys (a partial re-launch): its order for those
        # and the table's for the rest could make a baseline no launch asked for
        order = {}
    varied.sort(key=lambda k: list(order).index(k) if k in order else len(order))
    values = {}
    for k in varied:
        seen = list(dict.fromkeys(per[v.key].get(k, DEFAULT) for v in variants))
        listed = [x for x in order.get(k, []) if x in seen]
        values[k] = listed + [x for x in seen if x not in listed]
    points = {key: {k: s.get(k, DEFAULT) for k in varied} for key, s in per.items()}
    return Grid(varied, values, points)


def _independent(variants: list[Variant], keys: list[str]) -> list[str]:
    """Of the axes that differ, those not fixed by an earlier one: vit_tiny's
    talking_heads=false comes with choosing vit_tiny, layerscale_init with residual=layerscale;
    neither is a question of its own."""
    points = [_axis_settings(v) for v in variants]
    kept: list[str] = []
    for k in keys:
        fixed = False
        for j in kept:
            seen: dict[str, str] = {}
            if all(seen.setdefault(p.get(j, DEFAULT), p.get(k, DEFAULT)) == p.get(k, DEFAULT)
                   for p in points):
                fixed = True
                break
        if not fixed:
            kept.append(k)
    return kept


# --- the baseline ---------------------------------------------------------------------------


def _match_key(given: str, keys: list[str]) -> str:
    if given in keys:
        return given
    short = [k for k in keys if k.replace("/", ".").split(".")[-1] == given]
    if len(short) == 1:
        return short[0]
    close = difflib.get_close_matches(given, keys + [k.replace("/", ".").split(".")[-1]
                                                     for k in keys], n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise UserError(f"--baseline {given}: not a key the sweep varies "
                    f"({', '.join(keys) or 'none'}){hint}")


def choose_baseline(g: Grid, given: Iterable[str] = ()) -> dict[str, str]:
    """The grid's first value of each varied key, with ``given`` (``KEY=VALUE``; KEY may be
    the last part of the key, ``residual`` for ``model/residual``) put over it."""
    chosen = g.first()
    for item in given:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--baseline {item}: expected KEY=VALUE, e.g. "
                            f"{g.keys[0] if g.keys else 'model'}=vit_tiny")
        key = _match_key(key, g.keys)
        if value not in g.values[key]:
            close = difflib.get_close_matches(value, g.values[key], n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UserError(f"--baseline {key}={value}: not a value of the sweep "
                            f"({', '.join(g.values[key])}){hint}")
        chosen[key] = value
    return chosen


# --- comparisons and verdicts ---------------------------------------------------------------


@dataclass
class Answers:
    metric: str
    grid: Grid
    baseline: dict[str, str]
    baseline_variant: Variant | None
    differences: dict[str, Difference] = field(default_factory=dict)  # variant key -> diff
    verdicts: list[Verdict] = field(default_factory=list)
    # cost ("macs", "images_per_s") -> the keys of the variants on its Pareto front
    fronts: dict[str, set[str]] = field(default_factory=dict)
    # a chain's: each stage's baseline, its runs compared with it (caitlab.stages)
    stage_baselines: dict[str, dict[str, str]] = field(default_factory=dict)
    baseline_variants: list[Variant] = field(default_factory=list)
    correction: str = "holm"  # how the verdicts' p-values are held together (stats.correct)

    @property
    def baseline_keys(self) -> set[str]:
        return {v.key for v in self.baseline_variants}

    def baseline_text(self) -> str:
        if self.stage_baselines:
            return "; ".join(f"{stage}: {' '.join(f'{k}={v}' for k, v in base.items())}"
                             for stage, base in self.stage_baselines.items())
        return " ".join(f"{k}={v}" for k, v in self.baseline.items())


def _data_name(variant: Variant) -> str | None:
    """The data the variant trained on: its summary's ``data`` (the config choice; for a run
    written before summaries said, ``caitlab.record.upgrade`` names its datamodule class)."""
    data = variant.runs[0].summary.get("data")
    return str(data) if data else None


def answers(variants: list[Variant], sweep_dir: Path | None = None,
            given: Iterable[str] = (), correction: str = "holm") -> Answers:
    """``variants`` in the table's order. A chain's stages (``caitlab.stages``) are answered
    each on its own (a teacher is no baseline for its students), with ``given`` applied to
    the stages that vary its key. ``correction``: how all the verdicts' p-values are held
    together (:func:`caitlab.analysis.stats.correct`: holm, fdr_bh or none)."""
    result = _all_answers(variants, sweep_dir, given)
    result.verdicts = apply_correction(result.verdicts, correction)
    result.correction = correction
    return result


def _all_answers(variants: list[Variant], sweep_dir: Path | None,
                 given: Iterable[str]) -> Answers:
    stages = list(dict.fromkeys(v.stage for v in variants if v.stage is not None))
    if not stages:
        return _answers(variants, sweep_dir, given)
    metric = metric_of(variants)
    given = list(given)
    parts, used = {}, set()
    for stage in stages:
        mine = [v for v in variants if v.stage == stage]
        keys = grid(mine, sweep_dir).keys
        applies = []
        for item in given:
            try:
                _match_key(item.partition("=")[0], keys)
            except UserError:
                continue
            applies.append(item)
            used.add(item)
        parts[stage] = _answers(mine, sweep_dir, applies, metric)
    if unused := [item for item in given if item not in used]:
        _match_key(unused[0].partition("=")[0],
                   list(dict.fromkeys(k for a in parts.values() for k in a.grid.keys)))
    keys = list(dict.fromkeys(k for a in parts.values() for k in a.grid.keys))
    values = {k: list(dict.fromkeys(x for a in parts.values() for x in a.grid.values.get(k, [])))
              for k in keys}
    points = {v.key: {k: next((a.grid.points[v.key].get(k, DEFAULT) for a in parts.values()
                               if v.key in a.grid.points), DEFAULT) for k in keys}
              for v in variants}
    first = next((a for a in parts.values() if a.baseline_variant is not None), None)
    result = Answers(metric, Grid(keys, values, points), first.baseline if first else {},
                     first.baseline_variant if first else None)
    for stage, a in parts.items():
        result.differences.update(a.differences)
        result.verdicts += [replace(v, stage=stage) for v in a.verdicts]
        result.baseline_variants += a.baseline_variants
        if a.baseline:
            result.stage_baselines[stage] = a.baseline
    result.fronts = fronts(variants, {v.key: by_seed(v, metric) for v in variants})
    return result


def _answers(variants: list[Variant], sweep_dir: Path | None, given: Iterable[str],
             metric: str | None = None) -> Answers:
    metric = metric or metric_of(variants)
    g = grid(variants, sweep_dir)
    given = list(given)
    if given and not g.keys:
        raise UserError(f"--baseline {' '.join(given)}: the runs differ in nothing but the "
                        "seed, so there is nothing to compare")
    base = choose_baseline(g, given) if g.keys else {}
    seeds = {v.key: by_seed(v, metric) for v in variants}
    at = _at(g, variants, seeds)
    base_variant = at.get(tuple(sorted(base.items()))) if base else None
    result = Answers(metric, g, base, base_variant,
                     baseline_variants=[base_variant] if base_variant is not None else [])
    if base_variant is not None:
        for v in variants:
            d = difference(seeds[v.key], seeds[base_variant.key]) if v is not base_variant \
                else None
            if d is not None:
                result.differences[v.key] = d
    result.fronts = fronts(variants, seeds)
    result.verdicts = _verdicts(g, base, variants, seeds)
    return result


def _at(g: Grid, variants: list[Variant], seeds: dict[str, dict[Any, float]]
        ) -> dict[tuple, Variant]:
    """The variant at each point of the grid; where two share one (a run that failed and
    its rerun under another upstream stage), the one with completed runs."""
    at: dict[tuple, Variant] = {}
    for v in variants:
        point = tuple(sorted(g.points[v.key].items()))
        if point not in at or (seeds[v.key] and not seeds[at[point].key]):
            at[point] = v
    return at


def _verdicts(g: Grid, base: dict[str, str], variants: list[Variant],
              seeds: dict[str, dict[Any, float]]) -> list[Verdict]:
    """For each varied key, each variant off the baseline's value of it against its partner:
    the variant with that key at the baseline's value and every other key as it is; a
    question whose partner has runs but none that count is listed with why."""
    at = _at(g, variants, seeds)
    data = {v.key: _data_name(v) for v in variants}
    single_data = len(set(data.values())) == 1
    # a grid point answered by one variant is not also "not answered" by another one there
    # (a chain's student blocked by a failed teacher, then trained under the good one)
    counted = {tuple(sorted(g.points[v.key].items())) for v in variants if seeds[v.key]}
    out = []
    for key in g.keys:
        for v in variants:
            point = g.points[v.key]
            if point[key] == base[key]:
                continue
            if not seeds[v.key] and tuple(sorted(point.items())) in counted:
                continue
            partner = at.get(tuple(sorted({**point, key: base[key]}.items())))
            if partner is None:  # the grid has no such point: a question nobody asked
                continue
            mv, mb = v.macs, partner.macs
            out += compare(v, partner, (shown(key, point[key]), shown(key, base[key])),
                           (seeds[v.key], seeds[partner.key]),
                           key=key, value=point[key], base=base[key],
                           context={k: x for k, x in point.items() if k != key},
                           data=data[v.key] if single_data or data[v.key] == data[partner.key]
                           else None, macs_ratio=mv / mb if mv and mb else None)
    return out


def fronts(variants: list[Variant], seeds: dict[str, dict[Any, float]]) -> dict[str, set[str]]:
    """The Pareto fronts of mean accuracy against MACs (fewer is better) and against training
    images/s (more is better), over the variants with completed runs and that cost."""
    out = {}
    for cost, cheaper in (("macs", "lower"), ("images_per_s", "higher")):
        points = {v.key: (getattr(v, cost), statistics.fmean(seeds[v.key].values()))
                  for v in variants if seeds[v.key] and getattr(v, cost) is not None}
        if len(points) > 1:
            out[cost] = pareto_front(points, cheaper)
    return out


def few_seeds_note(answers_: Answers) -> str | None:
    """What more seeds would buy: an interval at all, or a verdict at the threshold."""
    return _few_seeds_note(answers_.differences.values(), answers_.verdicts)
