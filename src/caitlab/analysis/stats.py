"""The statistics behind the report's answers: a variant's mean with its confidence interval
over seeds, its difference to a baseline (paired by seed where the seeds pair), the
divergence rates of two variants, the correction over all of a report's verdicts, and the
throughput a run is credited with.

The rules:

- paired differences (>= :data:`MIN_SEEDS` shared seeds) are tested with the exact sign-flip
  (permutation) test up to :data:`EXACT_MAX` pairs, a paired t-test above. Its interval is
  the test inverted (Hartigan's subset means): it agrees with the p-value at every level, and
  where the seeds are too few for the level there is none (3 pairs give p >= 2/2^3 = 0.25);
- values are compared in units of :data:`RESOLUTION` points, so a float32 top-1 never turns
  "the same difference on every seed" into a zero-width "certain" interval with p=0;
- Welch's t-test where fewer than :data:`MIN_SEEDS` seeds pair; two groups without spread get
  the exact two-sample permutation test and no interval;
- divergence rates: Fisher's exact test;
- :func:`correct`: Holm (default) or Benjamini-Hochberg over every verdict of a report, each
  verdict then held to the threshold its p must meet, and its interval shown at that level.

numpy, scipy and statsmodels are imported on first use, so the module stays cheap for
caitlab-sweep and the training loop.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

ALPHA = 0.05  # a report's error rate: every verdict of it together (see correct)
CONFIDENCE = 1 - ALPHA
MIN_SEEDS = 3  # below this an interval over seeds is not worth printing
EXACT_MAX = 16  # paired: the exact sign-flip test up to this many pairs (2^16 sign flips)
# Points: differences are compared in these units. One image in a million; float32 holds a
# top-1 in points to ~1e-5, so its rounding noise never makes two equal differences unequal.
RESOLUTION = 1e-4
CORRECTIONS = {"holm": "Holm", "fdr_bh": "Benjamini-Hochberg (FDR)", "none": "no correction"}
@dataclass(frozen=True)
class Estimate:
    """Mean, standard deviation and t-interval of the mean over ``n`` seeds (no interval,
    and no std for one seed, below :data:`MIN_SEEDS`). A description of one variant: the
    verdicts' intervals are :class:`Difference`'s."""

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
    from scipy import stats  # heavy: kept off caitlab-sweep

    if std == 0:
        return Estimate(mean, 0.0, len(values), mean, mean)
    assert std is not None  # min_n >= 2 values: they have a standard deviation

    low, high = stats.t.interval(CONFIDENCE, len(values) - 1, loc=mean,
                                 scale=std / math.sqrt(len(values)))
    return Estimate(mean, std, len(values), float(low), float(high))


# --- paired: the exact sign-flip test ---------------------------------------------------------


def _units(values: Any) -> Any:
    import numpy as np  # heavy: kept off caitlab-sweep

    return np.rint(np.asarray(values, dtype=float) / RESOLUTION)


@lru_cache(maxsize=EXACT_MAX + 1)
def _signs(n: int) -> Any:
    """Every sign vector of length ``n``, (2^n, n) of +-1, the all-plus one first."""
    import numpy as np  # heavy: kept off caitlab-sweep

    bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
    return 1.0 - 2.0 * bits


def signflip_p(diffs: Any) -> Any:
    """Two-sided exact p-value of the sign-flip test of a zero mean, for each row of
    ``diffs`` (an array ``(..., n)`` of paired differences in points): the share of the 2^n
    sign flips whose ``|sum|`` is at least the observed one. ``n`` identical non-zero
    differences give 2/2^n, never 0."""
    import numpy as np  # heavy: kept off caitlab-sweep

    d = _units(diffs)
    n = d.shape[-1]
    flat = d.reshape(-1, n)
    signs = _signs(n)
    out = np.empty(len(flat))
    observed = np.abs(flat.sum(1))
    step = max(1, 2**22 // len(signs))  # rows per block: ~32 MB of flipped sums at a time
    for i in range(0, len(flat), step):
        flipped = np.abs(flat[i:i + step] @ signs.T)  # integers: exact ties, no tolerance
        out[i:i + step] = (flipped >= observed[i:i + step, None]).mean(1)
    return out.reshape(d.shape[:-1])


def signflip_interval(diffs: Sequence[float], alpha: float) -> tuple[float, float] | None:
    """The ``1 - alpha`` interval of the mean difference that the sign-flip test inverts to
    (Hartigan 1969: the k-th smallest and k-th largest of the 2^n - 1 subset means, k =
    floor(alpha 2^(n-1))): it excludes 0 exactly where :func:`signflip_p` <= alpha. None where
    the pairs are too few for the level (k = 0: unbounded)."""
    import numpy as np  # heavy: kept off caitlab-sweep

    d = _units(diffs)
    k = math.floor(alpha * 2 ** (len(d) - 1))
    if k < 1:
        return None
    subsets = (_signs(len(d)) < 0)[1:]
    means = np.sort(subsets @ d / subsets.sum(1))
    return float(means[k - 1]) * RESOLUTION, float(means[-k]) * RESOLUTION


def paired_p(diffs: Any) -> Any:
    """The report's p-value for each row of paired differences ``(..., n)``: the exact
    sign-flip test up to :data:`EXACT_MAX` pairs, the paired t-test above (or, where every
    pair differs by the same amount, the sign-flip test's 2/2^n, which needs no enumeration)."""
    import numpy as np  # heavy: kept off caitlab-sweep

    diffs = np.asarray(diffs, dtype=float)
    n = diffs.shape[-1]
    if n <= EXACT_MAX:
        return signflip_p(diffs)
    from scipy import stats  # heavy: kept off caitlab-sweep

    units = _units(diffs)
    same = (units == units[..., :1]).all(-1)
    with warnings.catch_warnings():  # the rows without spread: replaced just below
        warnings.simplefilter("ignore", RuntimeWarning)
        p = stats.ttest_1samp(diffs, 0.0, axis=-1).pvalue
    return np.where(same, np.where(units[..., 0] == 0, 1.0, 2.0 ** (1 - n)), p)


def needed_pairs(alpha: float) -> int:
    """The fewest pairs whose exact sign-flip test can reach ``p <= alpha`` (2/2^n <= alpha)."""
    return max(MIN_SEEDS, math.ceil(1 + math.log2(1 / alpha) - 1e-12))


# --- a difference and its verdict -------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """``variant - baseline``: the mean difference, its interval and the test's p-value.

    ``test``: ``paired`` (over the seeds both have), ``unpaired`` (Welch's t-test, or the
    exact permutation test for groups without spread) or ``too few seeds`` (fewer than
    :data:`MIN_SEEDS` on a side: no interval, no p). ``n``: the pairs for a paired test, else
    the smaller side's seeds. ``method``: the test by name. ``alpha``: the p at or below which
    this is a better/worse verdict (ALPHA, or its share after :func:`correct`); ``low``,
    ``high``: the ``1 - alpha`` interval (None where the seeds are too few for one, or where
    every pair differed by the same amount: ``same``). ``min_p``: the smallest p the test can
    give with these seeds. ``means_delta``: the difference of the two sides' means where it
    is not ``delta`` (a paired delta over fewer seeds than the sides have)."""

    delta: float
    test: str
    n: int
    n_variant: int
    n_baseline: int
    low: float | None = None
    high: float | None = None
    p: float | None = None
    method: str = ""
    alpha: float = ALPHA
    min_p: float = 0.0
    same: bool = False
    means_delta: float | None = None
    p_adjusted: float | None = None

    @property
    def rejected(self) -> bool:
        return self.p is not None and self.p <= self.alpha

    @property
    def outcome(self) -> str:
        if self.p is None:
            return f"too few seeds for a verdict (need {MIN_SEEDS})"
        if self.rejected:
            return "better" if self.delta > 0 else "worse"
        if self.min_p > self.alpha:
            need = (f"need {needed_pairs(self.alpha)} paired" if self.method == "exact sign-flip"
                    else "need more seeds")
            return f"too few seeds for a verdict at α={ALPHA:g}: {need}"
        return "no detectable difference"

    def seeds(self) -> str:
        if self.test == "paired":
            if self.n == self.n_variant == self.n_baseline:
                return f"{self.n} paired seeds"
            return f"{self.n} paired (of {self.n_variant} and {self.n_baseline} seeds)"
        unpaired = ", unpaired" if self.test == "unpaired" else ""
        if self.n_variant == self.n_baseline:
            each = " each" if unpaired else ""
            return f"{self.n_variant} seed{'s' * (self.n_variant > 1)}{each}{unpaired}"
        return f"{self.n_variant} and {self.n_baseline} seeds{unpaired}"


def difference(variant: Mapping[Any, float], baseline: Mapping[Any, float],
               min_n: int = MIN_SEEDS, alpha: float = ALPHA) -> Difference | None:
    """``variant`` and ``baseline``: seed -> value (points). Runs that share a seed are
    paired (the same data split, initialisation and batch order: the pairing takes that
    variance out); where fewer than ``min_n`` seeds are shared, Welch's test compares the two
    groups. ``alpha``: the threshold the verdict is held to, and so the interval's level."""
    if not variant or not baseline:
        return None
    a, b = list(variant.values()), list(baseline.values())
    means_delta = statistics.fmean(a) - statistics.fmean(b)
    n_a, n_b = len(a), len(b)
    shared = [s for s in variant if s in baseline]
    if len(shared) >= min_n:
        d = _paired([variant[s] - baseline[s] for s in shared], n_a, n_b, alpha)
        if abs(d.delta - means_delta) >= RESOLUTION:
            return _with(d, means_delta=means_delta)
        return d
    if min(n_a, n_b) < min_n:
        return Difference(means_delta, "too few seeds", min(n_a, n_b), n_a, n_b, alpha=alpha)
    return _unpaired(a, b, alpha)


def _with(d: Difference, **changes: Any) -> Difference:
    return replace(d, **changes)


def _paired(diffs: list[float], n_a: int, n_b: int, alpha: float) -> Difference:
    n = len(diffs)
    delta = statistics.fmean(diffs)
    p = float(paired_p(diffs))
    units = _units(diffs)
    same = bool((units == units[0]).all())
    if n <= EXACT_MAX:
        ci = signflip_interval(diffs, alpha)
        low, high = (None, None) if ci is None or same else ci
        return Difference(delta, "paired", n, n_a, n_b, low, high, p, "exact sign-flip",
                          alpha, 2.0 ** (1 - n), same)
    if same:
        return Difference(delta, "paired", n, n_a, n_b, None, None, p, "exact sign-flip",
                          alpha, 2.0 ** (1 - n), True)
    from scipy import stats  # heavy: kept off caitlab-sweep

    ci = stats.ttest_1samp(diffs, 0.0).confidence_interval(1 - alpha)
    return Difference(delta, "paired", n, n_a, n_b, float(ci.low), float(ci.high), p,
                      "paired t-test", alpha)


def _unpaired(a: list[float], b: list[float], alpha: float) -> Difference:
    import numpy as np  # heavy: kept off caitlab-sweep
    from scipy import stats  # heavy: kept off caitlab-sweep

    n_a, n_b = len(a), len(b)
    delta = statistics.fmean(a) - statistics.fmean(b)
    ua, ub = _units(a), _units(b)
    if (ua == ua[0]).all() and (ub == ub[0]).all():  # no spread: Welch's t is undefined
        result = stats.permutation_test(
            (ua, ub), lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis),
            permutation_type="independent", n_resamples=np.inf, vectorized=True)
        return Difference(delta, "unpaired", min(n_a, n_b), n_a, n_b, None, None,
                          float(result.pvalue), "exact permutation", alpha,
                          2 / math.comb(n_a + n_b, n_a), True)
    result = stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(1 - alpha)
    return Difference(delta, "unpaired", min(n_a, n_b), n_a, n_b, float(ci.low),
                      float(ci.high), float(result.pvalue), "Welch", alpha)


# --- divergence -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rates:
    """How often two variants' runs diverged: ``k`` of ``n`` runs that ran to an end
    (completed or diverged) each, Fisher's exact test between them."""

    k_variant: int
    n_variant: int
    k_baseline: int
    n_baseline: int
    p: float
    min_p: float
    alpha: float = ALPHA
    p_adjusted: float | None = None

    @property
    def rejected(self) -> bool:
        return self.p <= self.alpha

    @property
    def outcome(self) -> str:
        if self.rejected:
            more = self.k_variant / self.n_variant > self.k_baseline / self.n_baseline
            return f"diverges {'more' if more else 'less'} often"
        if self.min_p > self.alpha:
            return (f"too few runs for a verdict at α={ALPHA:g}: need "
                    f"{needed_runs(self.alpha)} each")
        return "no detectable difference in divergence"


def _fisher(k_a: int, n_a: int, k_b: int, n_b: int) -> float:
    from scipy import stats  # heavy: kept off caitlab-sweep

    return float(stats.fisher_exact([[k_a, n_a - k_a], [k_b, n_b - k_b]]).pvalue)


def rates(k_a: int, n_a: int, k_b: int, n_b: int, alpha: float = ALPHA) -> Rates:
    """``k_a`` of ``n_a`` runs diverged against ``k_b`` of ``n_b``."""
    return Rates(k_a, n_a, k_b, n_b, _fisher(k_a, n_a, k_b, n_b), _fisher(n_a, n_a, 0, n_b),
                 alpha)


def needed_runs(alpha: float) -> int:
    """The fewest runs per side with which Fisher's test can reach ``p <= alpha`` (every run
    of one side diverged, none of the other)."""
    n = 1
    while n < 64 and _fisher(n, n, 0, n) > alpha:
        n += 1
    return n


# --- the correction over a report's verdicts ----------------------------------------------------


def thresholds(ps: Any, method: str = "holm", alpha: float = ALPHA) -> Any:
    """The p at or below which each verdict is better/worse, for each row of ``ps`` (an array
    ``(..., m)``: the p-values of all of a report's verdicts). ``holm``: every report holds a
    wrong verdict with probability <= alpha (alpha / (m - rank) for the verdicts its step-down
    rejects, alpha / (m - the first kept rank) for the others); ``fdr_bh``: of a report's
    verdicts a share <= alpha is wrong on average (Benjamini-Hochberg: alpha R / m for all, R
    rejected, at least 1); ``none``: each on its own at alpha. A ``1 - threshold`` interval
    excludes 0 exactly where the verdict says better or worse."""
    import numpy as np  # heavy: kept off caitlab-sweep

    if method not in CORRECTIONS:
        raise ValueError(f"correction {method!r}: one of {', '.join(CORRECTIONS)}")
    ps = np.asarray(ps, dtype=float)
    m = ps.shape[-1]
    if method == "none" or m == 0:
        return np.full(ps.shape, alpha)
    order = np.argsort(ps, axis=-1, kind="stable")
    ranked = np.take_along_axis(ps, order, -1)
    rank = np.arange(m)
    if method == "holm":
        critical = alpha / (m - rank)
        rejected = np.cumprod(ranked <= critical, axis=-1).sum(-1, keepdims=True)
        kept = np.minimum(rejected, m - 1)
        out = np.where(rank < rejected, critical, alpha / (m - kept))
    else:
        below = ranked <= alpha * (rank + 1) / m
        count = np.where(below.any(-1), m - np.argmax(below[..., ::-1], axis=-1), 0)
        out = np.broadcast_to((alpha * np.maximum(count, 1) / m)[..., None], ps.shape)
    unsorted = np.empty_like(out)
    np.put_along_axis(unsorted, order, out, -1)
    return unsorted


def correct(ps: Sequence[float], method: str = "holm", alpha: float = ALPHA
            ) -> tuple[list[float], list[float]]:
    """(adjusted p-values, :func:`thresholds`) of ``ps``, the p-values of all of a report's
    verdicts; the adjusted ones are ``statsmodels``' ``multipletests``: at most ``alpha``
    where p is at most its threshold."""
    limits = [float(t) for t in thresholds(list(ps), method, alpha)]
    if method == "none" or not ps:
        return list(ps), limits
    from statsmodels.stats.multitest import multipletests  # loads pandas (seconds): verdicts only

    adjusted = multipletests(list(ps), alpha=alpha, method=method)[1]
    return [float(x) for x in adjusted], limits


# --- cost -------------------------------------------------------------------------------------


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
