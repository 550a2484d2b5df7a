"""The runs a report is made of: read from a sweep folder or a wandb project, grouped into
variants (runs that differ only by seed), with the code they come from."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caitlab.analysis.stats import throughput
from caitlab.provenance import commit_of
from caitlab.record import load_summary, upgrade
from caitlab.status import WANDB_STATES, Status, diverged_label


@dataclass
class Run:
    name: str
    summary: dict[str, Any]
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, val/top1)
    folder: Path | None = None  # the run folder, for runs read from disk
    by_epoch_ips: dict[int, float] = field(default_factory=dict)  # epoch -> training img/s

    @property
    def images_per_s(self) -> float | None:
        """Training throughput by :data:`caitlab.analysis.stats.THROUGHPUT_RULE`, from the
        epochs' own figures where the run logged them (a summary written before caitlab took
        the median holds the last epoch's)."""
        if self.by_epoch_ips:
            return throughput(self.by_epoch_ips)
        value = self.summary.get("images_per_s")
        return float(value) if isinstance(value, (int, float)) and value > 0 else None

    @property
    def status(self) -> str:
        return self.summary.get("status") or Status.PENDING

    @property
    def state(self) -> str:
        if self.status == Status.DIVERGED:
            return diverged_label(self.summary)
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
        return [r.summary for r in self.runs if r.status == Status.COMPLETED]

    def values(self, metric: str) -> list[float]:
        """The metric of each completed run that has a finite one (a NaN says nothing)."""
        return [s[metric] for s in self.completed()
                if isinstance(s.get(metric), (int, float)) and math.isfinite(s[metric])]

    @property
    def images_per_s(self) -> float | None:
        """The median of its completed runs' throughput (:attr:`Run.images_per_s`)."""
        ips = [r.images_per_s for r in self.runs
               if r.status == Status.COMPLETED and r.images_per_s is not None]
        return statistics.median(ips) if ips else None

    @property
    def stage(self) -> str | None:
        """The chain's stage its runs belong to (``caitlab.stages``), None outside a chain."""
        stage = self.runs[0].summary.get("stage")
        return None if stage is None else str(stage)

    @property
    def stage_index(self) -> int:
        index = self.runs[0].summary.get("stage_index")
        return index if isinstance(index, int) else 0

    @property
    def macs(self) -> float | None:
        macs = (self.runs[0].summary.get("model") or {}).get("macs")
        return float(macs) if isinstance(macs, (int, float)) and macs > 0 else None

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


IPS = "perf/images_per_s"


def _read_metrics(metrics_csv: Path) -> tuple[list[tuple[int, float]], dict[int, float]]:
    """(epoch, val/top1) per epoch, and epoch -> training images/s."""
    curve: dict[int, float] = {}
    ips: dict[int, float] = {}
    if not metrics_csv.is_file():
        return [], ips
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            top1 = float(row["val/top1"]) if row.get("val/top1") else math.nan
            if math.isfinite(top1):
                curve[epoch] = top1
            if row.get(IPS):
                ips[epoch] = float(row[IPS])
    return sorted(curve.items()), ips


def collect_runs(sweep_dir: Path) -> list[Run]:
    """Every run folder below ``sweep_dir`` (one with a summary.json), sorted by path; none
    below a hidden folder (``.submitit`` holds a submission's code snapshot, whose
    tests/fixtures have run folders of their own)."""
    runs = []
    for path in sorted(Path(sweep_dir).rglob("summary.json")):
        if any(part.startswith(".") for part in path.relative_to(sweep_dir).parts):
            continue
        try:
            summary = load_summary(path)
        except (OSError, ValueError) as err:  # cut short by a crash or a full disk
            summary = {"status": Status.UNREADABLE,
                       "error": f"{path}: {getattr(err, 'strerror', None) or err}"}
        curve, ips = _read_metrics(path.parent / "metrics.csv")
        runs.append(Run(path.parent.name, summary, curve, folder=path.parent,
                        by_epoch_ips=ips))
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
        summary = upgrade({k: v for k, v in dict(wrun.summary).items() if not k.startswith("_")})
        summary.setdefault("status", WANDB_STATES.get(getattr(wrun, "state", ""), Status.PENDING))
        if "variant" not in summary:
            config = dict(wrun.config)
            config.pop("seed", None)
            summary["variant"] = json.dumps(config, sort_keys=True, default=str)
        # one scan per key: scan_history keeps only the rows that have every key asked for,
        # and the epoch's val/top1 and images/s are logged at different steps
        curve, ips = ({int(row["epoch"]): float(row[key])
                       for row in wrun.scan_history(keys=["epoch", key])
                       if row.get(key) is not None and row.get("epoch") is not None}
                      for key in ("val/top1", IPS))
        runs.append(Run(getattr(wrun, "name", wrun.id), summary, sorted(curve.items()),
                        by_epoch_ips=ips))
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


def measured_on_selection(summary: dict[str, Any]) -> bool:
    """Whether a run's ``test/top1`` was measured on the images that chose its checkpoint, as
    its summary says (``selection.test_is_selection``; ``caitlab.record.upgrade`` says it for
    summaries written before caitlab recorded it)."""
    selection = summary.get("selection")
    # a mapping: a dict from summary.json, wandb's own nested summary type from wandb
    return selection is not None and hasattr(selection, "get") and \
        selection.get("test_is_selection") is True


def selection_warning(runs: list[Run], root: Path | None = None) -> str | None:
    """One line naming the run folders (relative to ``root``) whose ``test/top1`` was measured
    on the images that chose their checkpoint (:func:`measured_on_selection`); None if none.

    The best of a run's epochs on some images scores above its worth on those same images,
    and the more, the noisier the variant's epochs: a verdict between such runs may be
    that, not the variants."""
    found = [run for run in runs
             if run.summary.get("test/top1") is not None and measured_on_selection(run.summary)]
    if not found:
        return None

    def named(run: Run) -> str:
        if run.folder is not None and root is not None and run.folder.is_relative_to(root):
            return str(run.folder.relative_to(root))
        return str(run.folder or run.name)

    return (f"warning: test/top1 of {len(found)} run{'s' * (len(found) > 1)} was measured on "
            "the images that chose its checkpoint (best on val, scored on val: biased up, "
            "the more for noisier variants); a completed folder is not trained again, so move "
            "these aside and rerun them to score apart from the selection: "
            + ", ".join(named(run) for run in found))
