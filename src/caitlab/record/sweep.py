"""A sweep folder's records: each run's summary (in today's form) with its learning curve and
throughput from ``metrics.csv``, the sweep's device-hours, and the grid's order as the sweep's
first launch listed it. What ``caitlab-sweep``, the report and the launcher read of a sweep.

Stdlib only at import (Hydra's override parser only where a sweep's order is read).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caitlab.record import SUMMARY, load_summary
from caitlab.status import Status, diverged_label

METRICS = "metrics.csv"

THROUGHPUT_RULE = "median of each run's epochs after the first"


def throughput(by_epoch: Mapping[int, float]) -> float | None:
    """A run's images/s: the median over its epochs after the first (the first pays for
    warm-up: worker start, allocator, compilation), or the first where it is the only one."""
    later = [v for e, v in by_epoch.items() if e > min(by_epoch) and v is not None]
    if later:
        return statistics.median(later)
    return next(iter(by_epoch.values()), None)


@dataclass
class Run:
    """A run as a sweep's readers see it: its name (its folder's, or wandb's), its summary in
    today's form, its validation curve and its training throughput by epoch."""

    name: str
    summary: dict[str, Any]
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, val/top1)
    folder: Path | None = None  # the run folder, for runs read from disk
    by_epoch_ips: dict[int, float] = field(default_factory=dict)  # epoch -> training img/s

    @property
    def images_per_s(self) -> float | None:
        """Training throughput by :data:`THROUGHPUT_RULE`, from the
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


IPS = "perf/images_per_s"


def read_metrics(metrics_csv: Path) -> tuple[list[tuple[int, float]], dict[int, float]]:
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
    for path in sorted(Path(sweep_dir).rglob(SUMMARY)):
        if any(part.startswith(".") for part in path.relative_to(sweep_dir).parts):
            continue
        try:
            summary = load_summary(path)
        except (OSError, ValueError) as err:  # cut short by a crash or a full disk
            summary = {"status": Status.UNREADABLE,
                       "error": f"{path}: {getattr(err, 'strerror', None) or err}"}
        curve, ips = read_metrics(path.parent / METRICS)
        runs.append(Run(path.parent.name, summary, curve, folder=path.parent,
                        by_epoch_ips=ips))
    return runs


def device_hours(runs: Iterable[Any]) -> float | None:
    """Device-hours of ``runs`` (wall x devices over every attempt: seeds and reruns count),
    None when no run recorded them (runs written before caitlab did)."""
    hours = [r.summary["device_hours"] for r in runs
             if isinstance(r.summary.get("device_hours"), (int, float))]
    return sum(hours) if hours else None


ORDER_FILE = "sweep_order.yaml"  # the grid's order as the sweep's first launch listed it


def order_of(saved: dict[str, Any]) -> dict[str, list[str]]:
    """key -> values in the order a composed sweep config (``multirun.yaml``'s content)
    lists them: its sweep overrides, sweeper params and a chain's stages."""
    from hydra.core.override_parser.overrides_parser import (  # Hydra: kept off caitlab-sweep
        OverridesParser,
    )

    hydra = saved.get("hydra") or {}
    lines = [str(x) for x in (hydra.get("overrides") or {}).get("task") or []]
    params = dict((hydra.get("sweeper") or {}).get("params") or {})
    for delta in (saved.get("stages") or {}).values():  # a chain's (caitlab.stages)
        params.update({k: v for k, v in (delta or {}).items() if "${" not in str(v)})
    lines += [f"{k}={v}" for k, v in params.items()]
    order: dict[str, list[str]] = {}
    for o in OverridesParser.create().parse_overrides(lines):
        if o.is_sweep_override():
            order.setdefault(o.key_or_group, list(o.sweep_string_iterator()))
    return order
