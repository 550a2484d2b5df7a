"""The report's plots (PNG), drawn to be printed: test top-1 vs depth by residual scaling,
top-1 vs MACs and vs images/s with the Pareto front drawn and its members ringed, and the
validation curves as one mean line and band per variant. Every top-1 point carries its 95%
interval over seeds (where there are enough seeds for one).

Nothing is written on the points themselves: each variant has a colour and its family's
marker (ViT-like o, CaiT-like ^, a project's own s), named in a legend outside the axes, so
that labels can neither overlap nor leave the figure however close the points lie; matplotlib's
constrained layout makes the room for it.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from caitlab.analysis.report_answers import Answers, by_seed, metric_name
from caitlab.analysis.report_runs import Variant
from caitlab.analysis.report_table import extra_axes, variant_label
from caitlab.analysis.stats import MIN_SEEDS, Estimate, estimate

if TYPE_CHECKING:  # matplotlib is imported where used: importing this stays cheap
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MARKERS = {"ViT": "o", "CaiT": "^", "own": "s"}
BARS = f"bars: 95% CI over seeds (with {MIN_SEEDS}+ seeds)"


def _pyplot() -> ModuleType:
    import matplotlib  # heavy: kept off caitlab-sweep and caitlab-report --help

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): the backend is chosen on import

    return plt


def _colors(variants: list[Variant]) -> dict[str, Any]:
    """A colour per variant, stable across the plots of one report."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")
    return {v.key: cmap(i % cmap.N) for i, v in enumerate(variants)}


def _figure(n_labels: int, longest: int, height: float = 4.2) -> tuple[Figure, Axes]:
    """A figure wide enough for its legend beside the axes."""
    plt = _pyplot()
    width = 5.5 + (0.075 * longest + 0.5 if n_labels else 0)
    return plt.subplots(figsize=(width, height), layout="constrained")


def _point(ax: Axes, x: float, e: Estimate, **style: Any) -> None:
    """The mean with its interval as an error bar (none below MIN_SEEDS seeds)."""
    yerr = (None if e.low is None or e.high is None  # (both set, or neither)
            else [[e.mean - e.low], [e.high - e.mean]])
    ax.errorbar([x], [e.mean], yerr=yerr, capsize=3, linestyle="none", markersize=7, **style)


def _legend(fig: Figure, ax: Axes) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize="small",
                   frameon=False)


def _readable_x(ax: Axes, values: list[float]) -> None:
    """A log x scale where the values span more than 4x, with plain-number ticks at 1-2-5
    (matplotlib's default labels minor ticks too on a short log axis, and they collide)."""
    from matplotlib import ticker  # heavy: kept off caitlab-sweep

    if min(values) > 0 and max(values) > 4 * min(values):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_locator(ticker.LogLocator(subs="auto"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    else:
        ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=6))


def _dodged(xs: list[float], step: float = 0.012) -> list[float]:
    """A factor per point that spreads points of one cost (within 0.5%) a little apart, so
    that their markers and bars do not hide each other."""
    factors = [1.0] * len(xs)
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(xs):
        key = next((j for j in groups if abs(xs[j] - x) <= 0.005 * max(abs(x), 1e-12)), i)
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        for rank, i in enumerate(members):
            factors[i] = 1.0 + step * (rank - (len(members) - 1) / 2)
    return factors


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def figure_top1_vs_depth(variants: list[Variant], metric: str = "test/top1") -> Figure | None:
    """One line per residual scaling: the paper's Table 1 as a picture; None where the
    sweep has fewer than two depths."""
    points: dict[str, list[tuple[int, Estimate]]] = {}
    several = len({v.model_name for v in variants}) > 1
    for v in variants:
        e = estimate(list(by_seed(v, metric).values()))
        if e is not None and v.axes.get("depth") is not None:
            # a line per model and residual scaling; a project's own model (no residual
            # axis) gets a line of its own
            residual = v.axes.get("residual")
            line = " ".join(p for p in (v.model_name if several or not residual else "",
                                        str(residual or "")) if p)
            points.setdefault(line, []).append((v.axes["depth"], e))
    if not points or len({d for pts in points.values() for d, _ in pts}) < 2:
        return None
    fig, ax = _figure(len(points), max(len(k) for k in points))
    depths = [d for pts in points.values() for d, _ in pts]
    step = 0.012 * (max(depths) - min(depths))  # lines dodged apart, so bars do not hide
    for i, (name, pts) in enumerate(sorted(points.items())):
        pts.sort(key=lambda p: p[0])
        off = step * (i - (len(points) - 1) / 2)
        drawn, = ax.plot([d + off for d, _ in pts], [e.mean for _, e in pts], marker="o",
                         label=name)
        for d, e in pts:
            _point(ax, d + off, e, color=drawn.get_color())
    from matplotlib import ticker  # heavy: kept off caitlab-sweep

    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("depth (self-attention layers)")
    ax.set_ylabel(f"{metric_name(metric)} (%)")
    ax.set_title(f"top-1 vs depth by residual scaling\n{BARS}", fontsize="medium")
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    return fig


def _front_line(ax: Axes, pts: list[tuple[float, float]], lower_is_cheaper: bool) -> None:
    """The Pareto front as a staircase: from the cheapest member, accuracy holds until the
    next member buys more of it."""
    pts = sorted(pts, reverse=not lower_is_cheaper)
    xs: list[float] = []
    ys: list[float] = []
    for x, y in pts:
        if xs:
            xs.append(x)
            ys.append(ys[-1])
        xs.append(x)
        ys.append(y)
    ax.plot(xs, ys, linestyle="--", color="0.35", linewidth=1, zorder=1,
            label="Pareto front")
    ax.scatter([x for x, _ in pts], [y for _, y in pts], s=220, facecolors="none",
               edgecolors="0.2", linewidths=1.2, zorder=3)


def figure_top1_vs_cost(variants: list[Variant], cost: str, answers: Answers | None = None,
                        extra: Iterable[str] = ()) -> Figure | None:
    """Top-1 against MACs (``cost='macs'``) or training images/s (``'images_per_s'``): a
    point per variant with its interval, ViT-like and CaiT-like as two marker families, the
    Pareto front drawn. None where no variant has both."""
    metric = answers.metric if answers else "test/top1"
    drawn = []
    for v in variants:
        x, e = getattr(v, cost), estimate(list(by_seed(v, metric).values()))
        if x is not None and e is not None:
            drawn.append((v, x, e))
    if not drawn:
        return None
    scale, unit = 1.0, "training images/s"
    if cost == "macs":
        giga = max(x for _, x, _ in drawn) >= 1e9
        scale, unit = (1e9, "GMACs per image") if giga else (1e6, "MMACs per image")
    labels = [variant_label(v, extra) for v, _, _ in drawn]
    fig, ax = _figure(len(drawn), max(len(s) for s in labels) + 4)
    colors = _colors([v for v, _, _ in drawn])
    shift = _dodged([x for _, x, _ in drawn])
    for (v, x, e), label, k in zip(drawn, labels, shift, strict=True):
        _point(ax, x * k / scale, e, color=colors[v.key], marker=MARKERS[v.family],
               label=label)
    front = (answers.fronts.get(cost) if answers else None) or set()
    members = [(x * k / scale, e.mean) for (v, x, e), k in zip(drawn, shift, strict=True)
               if v.key in front]
    if len(members) > 1 or (members and len(drawn) > 1):
        _front_line(ax, members, lower_is_cheaper=cost == "macs")
    _readable_x(ax, [x / scale for _, x, _ in drawn])
    ax.margins(x=0.08, y=0.12)
    ax.set_xlabel(unit)
    ax.set_ylabel(f"{metric_name(metric)} (%)")
    what = "MACs" if cost == "macs" else "throughput"
    ax.set_title(f"top-1 vs {what}; ringed: on the Pareto front\n{BARS}", fontsize="medium")
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    return fig


def figure_val_curves(variants: list[Variant], extra: Iterable[str] = ()) -> Figure | None:
    """A mean line per variant over its seeds' validation curves, with a band of ± one
    standard deviation where it has two seeds or more."""
    curves = [(v, [r.curve for r in v.runs if r.curve]) for v in variants]
    curves = [(v, c) for v, c in curves if c]
    if not curves:
        return None
    labels = [variant_label(v, extra) + (f" (n={len(c)})" if len(c) > 1 else "")
              for v, c in curves]
    fig, ax = _figure(len(curves), max(len(s) for s in labels), height=4.5)
    colors = _colors([v for v, _ in curves])
    for (v, runs_curves), label in zip(curves, labels, strict=True):
        per_epoch: dict[int, list[float]] = {}
        for curve in runs_curves:
            for epoch, top1 in curve:
                per_epoch.setdefault(epoch + 1, []).append(100 * top1)
        epochs = sorted(per_epoch)
        mean = [statistics.fmean(per_epoch[e]) for e in epochs]
        ax.plot(epochs, mean, color=colors[v.key], linewidth=1.4, label=label)
        if len(runs_curves) > 1:
            std = [statistics.stdev(per_epoch[e]) if len(per_epoch[e]) > 1 else 0.0
                   for e in epochs]
            ax.fill_between(epochs, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)],
                            color=colors[v.key], alpha=0.18, linewidth=0)
    from matplotlib import ticker  # heavy: kept off caitlab-sweep

    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("validation curves: mean over seeds, band ± 1 std", fontsize="medium")
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    return fig


def figures(variants: list[Variant], answers: Answers | None = None) -> dict[str, Any]:
    """name -> matplotlib figure, for the plots this sweep has something to show in."""
    extra = extra_axes(variants)
    metric = answers.metric if answers else "test/top1"
    made = {"top1_vs_depth": figure_top1_vs_depth(variants, metric),
            "top1_vs_macs": figure_top1_vs_cost(variants, "macs", answers, extra),
            "top1_vs_throughput": figure_top1_vs_cost(variants, "images_per_s", answers,
                                                      extra),
            "val_curves": figure_val_curves(variants, extra)}
    return {name: fig for name, fig in made.items() if fig is not None}


def write_plots(variants: list[Variant], out_dir: Path,
                answers: Answers | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_save(fig, out_dir / f"{name}.png")
            for name, fig in figures(variants, answers).items()]
