"""The report's plots (PNG): test top-1 vs depth by residual scaling, top-1 vs MACs and vs
images/s with ViT-like and CaiT-like variants as two marker families, and the validation curve
of every run."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from pathlib import Path

from caitlab.analysis.report_runs import Run, Variant
from caitlab.analysis.report_table import extra_axes, variant_label


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


def _cost(variant: Variant, cost: str) -> float | None:
    """The variant's MACs (in M: drawn in G or M, whichever reads) or its mean images/s."""
    if cost == "macs":
        x = (variant.runs[0].summary.get("model") or {}).get("macs")
        x = None if x is None else x / 1e6
    else:
        x = _mean([s["images_per_s"] for s in variant.completed() if s.get("images_per_s")])
    return None if x is None or math.isnan(x) else x


def _scatter_families(ax, variants: list[Variant], cost: str, extra: Iterable[str]) -> int:
    """ViT, CaiT and a project's own models as three marker families; the points drawn."""
    drawn = 0
    for family, marker in (("ViT", "o"), ("CaiT", "^"), ("own", "s")):
        xs, ys, labels = [], [], []
        for v in variants:
            top1 = v.values("test/top1")
            x = _cost(v, cost) if v.family == family and top1 else None
            if x is not None:
                xs.append(x)
                ys.append(_mean(top1) * 100)
                labels.append(variant_label(v, extra))
        if xs:
            drawn += len(xs)
            ax.scatter(xs, ys, marker=marker, s=60,
                       label="own models" if family == "own" else family)
            for x, y, label in zip(xs, ys, labels, strict=True):
                ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    return drawn


def _macs_axis(ax) -> None:
    """MMACs or GMACs as the costs read; a log axis only where the costs span a range."""
    xs = [x for c in ax.collections for x in c.get_offsets()[:, 0]]
    giga = max(xs) >= 1000
    if giga:  # the points were drawn in MMACs
        for c in ax.collections:
            c.set_offsets(c.get_offsets() / [1000, 1])
        for t in ax.texts:
            t.xy = (t.xy[0] / 1000, t.xy[1])
        xs = [x / 1000 for x in xs]
    ax.set_xlabel(f"{'G' if giga else 'M'}MACs per image")
    if max(xs) > 4 * min(xs):
        ax.set_xscale("log")


def _labels_inside(ax) -> None:
    """Labels of points on the right run leftwards, inside the axes."""
    lo, hi = ax.get_xlim()
    mid = math.sqrt(lo * hi) if ax.get_xscale() == "log" else (lo + hi) / 2
    for t in ax.texts:
        if t.xy[0] > mid:
            t.set_horizontalalignment("right")
            t.xyann = (-3, 3)


def plot_top1_vs_cost(variants: list[Variant], path: Path, cost: str,
                      extra: Iterable[str] = ()) -> Path | None:
    """Top-1 against MACs (``cost='macs'``) or images/s (``'images_per_s'``), ViT vs CaiT
    (vs a project's own models); points labelled by :func:`variant_label` with ``extra``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    if not _scatter_families(ax, variants, cost, extra):
        plt.close(fig)
        return None
    ax.set_xlabel("training images/s")
    if cost == "macs":
        _macs_axis(ax)
    ax.margins(x=0.2, y=0.1)
    _labels_inside(ax)
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
