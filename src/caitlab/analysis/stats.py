"""The statistics behind the report's answers: a variant's mean with its confidence interval
over seeds, its difference to a baseline (paired by seed where the seeds pair), and the
throughput a run is credited with.

scipy does the t-tests (``ttest_rel``, Welch's ``ttest_ind``) and their intervals; it is
imported on first use, so the module stays cheap for caitlab-sweep and the training loop.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CONFIDENCE = 0.95
MIN_SEEDS = 3  # below this an interval over seeds is not worth printing
THROUGHPUT_RULE = "median of each run's epochs after the first"


def throughput(by_epoch: Mapping[int, float]) -> float | None:
    """A run's images/s: the median over its epochs after the first (the first pays for
    warm-up: worker start, allocator, compilation), or the first where it is the only one."""
    later = [v for e, v in by_epoch.items() if e > min(by_epoch) and v is not None]
    if later:
        return statistics.median(later)
    return next(iter(by_epoch.values()), None)


@dataclass(frozen=True)
class Estimate:
    """Mean, standard deviation and t-interval of the mean over ``n`` seeds (no interval,
    and no std for one seed, below :data:`MIN_SEEDS`)."""

    mean: float
    std: float | None
    n: int
    low: float | None = None
    high: float | None = None


def estimate(values: list[float], min_n: int = MIN_SEEDS) -> Estimate | None:
    if not values:
        return None
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    if len(values) < min_n:
        return Estimate(mean, std, len(values))
    from scipy import stats

    if std == 0:
        return Estimate(mean, 0.0, len(values), mean, mean)
    low, high = stats.t.interval(CONFIDENCE, len(values) - 1, loc=mean,
                                 scale=std / math.sqrt(len(values)))
    return Estimate(mean, std, len(values), float(low), float(high))


@dataclass(frozen=True)
class Difference:
    """``variant - baseline``: the mean difference, its interval and the test's p-value.

    ``test`` is ``paired`` (a paired t-test over the seeds both have), ``unpaired`` (Welch's
    t-test) or ``too few seeds`` (fewer than :data:`MIN_SEEDS` on a side: no interval, no p).
    ``n`` is the pairs for a paired test, else the smaller side's seeds."""

    delta: float
    test: str
    n: int
    n_variant: int
    n_baseline: int
    low: float | None = None
    high: float | None = None
    p: float | None = None

    @property
    def outcome(self) -> str:
        if self.low is None or self.high is None:
            return f"too few seeds for a verdict (need {MIN_SEEDS})"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "no detectable difference"

    def seeds(self) -> str:
        if self.test == "paired":
            return f"{self.n} seeds"
        unpaired = ", unpaired" if self.test == "unpaired" else ""
        if self.n_variant == self.n_baseline:
            each = " each" if unpaired else ""
            return f"{self.n_variant} seed{'s' * (self.n_variant > 1)}{each}{unpaired}"
        return f"{self.n_variant} and {self.n_baseline} seeds{unpaired}"


def difference(variant: Mapping[Any, float], baseline: Mapping[Any, float],
               min_n: int = MIN_SEEDS) -> Difference | None:
    """``variant`` and ``baseline``: seed -> value. Runs that share a seed are paired (the
    same data split, initialisation and batch order: the pairing takes that variance out);
    where fewer than ``min_n`` seeds are shared, Welch's test compares the two groups."""
    if not variant or not baseline:
        return None
    a, b = list(variant.values()), list(baseline.values())
    delta = statistics.fmean(a) - statistics.fmean(b)
    n_a, n_b = len(a), len(b)
    shared = [s for s in variant if s in baseline]
    if len(shared) >= min_n:
        return _paired([variant[s] for s in shared], [baseline[s] for s in shared], n_a, n_b)
    if min(n_a, n_b) < min_n:
        return Difference(delta, "too few seeds", min(n_a, n_b), n_a, n_b)
    from scipy import stats

    if statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0:
        return _certain(delta, "unpaired", min(n_a, n_b), n_a, n_b)
    result = stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(CONFIDENCE)
    return Difference(delta, "unpaired", min(n_a, n_b), n_a, n_b, float(ci.low),
                      float(ci.high), float(result.pvalue))


def _paired(a: list[float], b: list[float], n_a: int, n_b: int) -> Difference:
    from scipy import stats

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    delta = statistics.fmean(diffs)
    if statistics.pvariance(diffs) == 0:
        return _certain(delta, "paired", len(diffs), n_a, n_b)
    result = stats.ttest_rel(a, b)
    ci = result.confidence_interval(CONFIDENCE)
    return Difference(delta, "paired", len(diffs), n_a, n_b, float(ci.low), float(ci.high),
                      float(result.pvalue))


def _certain(delta: float, test: str, n: int, n_a: int, n_b: int) -> Difference:
    """Every seed gave the same difference: no spread to test against (scipy returns nan)."""
    return Difference(delta, test, n, n_a, n_b, delta, delta, 1.0 if delta == 0 else 0.0)


def pareto_front(points: Mapping[Any, tuple[float, float]], cheaper: str = "lower"
                 ) -> set[Any]:
    """The keys of ``points`` (key -> (cost, accuracy)) no other point beats: at least as
    accurate and at least as cheap, and strictly one of the two. ``cheaper``: whether a lower
    cost (MACs) or a higher one (images/s) is the better."""
    sign = 1 if cheaper == "lower" else -1

    def beats(p: tuple[float, float], q: tuple[float, float]) -> bool:
        return (sign * p[0] <= sign * q[0] and p[1] >= q[1]
                and (sign * p[0] < sign * q[0] or p[1] > q[1]))

    return {k for k, q in points.items()
            if not any(beats(p, q) for j, p in points.items() if j != k)}
