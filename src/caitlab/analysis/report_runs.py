"""The runs a report is made of: read from a sweep folder or a wandb project, grouped into
variants (runs that differ only by seed), with the code they come from."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caitlab.provenance import commit_of
from caitlab.record import upgrade
from caitlab.record.sweep import IPS, Run
from caitlab.status import WANDB_STATES, Status


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
