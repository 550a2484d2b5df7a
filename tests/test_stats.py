"""The verdicts' statistics by closed form and by simulation: the exact sign-flip test and
its interval, the correction over a report's verdicts, and, over thousands of simulated
sweeps of the shipped grids' shapes with no true difference, a report's chance of holding
any wrong better/worse line."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from caitlab.analysis.report_verdicts import interval, sign_digits
from caitlab.analysis.stats import (
    ALPHA,
    Difference,
    correct,
    difference,
    needed_pairs,
    paired_p,
    rates,
    signflip_interval,
    signflip_p,
    thresholds,
)

IMAGES = 360  # a test set this small makes equal differences on every seed common


def _top1(correct_images: np.ndarray) -> np.ndarray:
    """Top-1 in points as a run reports it: a float32 fraction of the test set."""
    return (correct_images.astype(np.float32) / np.float32(IMAGES)).astype(float) * 100


def grid_pairs(shape: tuple[int, ...]) -> np.ndarray:
    """The (variant, partner) pairs a full grid's verdicts compare, baseline at index 0 of
    every key: per key, each point off the baseline's value against the point with that key
    at the baseline's value (report_answers._verdicts)."""
    points = list(itertools.product(*(range(k) for k in shape)))
    index = {p: i for i, p in enumerate(points)}
    return np.array([(index[p], index[p[:j] + (0,) + p[j + 1:]])
                     for j in range(len(shape)) for p in points if p[j] != 0])


def null_sweeps(shape: tuple[int, ...], seeds: int, sweeps: int, rng: np.random.Generator
                ) -> np.ndarray:
    """(sweeps, verdicts, seeds) paired differences of equal variants: each seed shifts all
    its runs alike (its split and batch order), each run adds its own noise, and top-1 is
    whole images of :data:`IMAGES`, read as float32."""
    variants = math.prod(shape)
    seed_effect = rng.normal(0, 6, (sweeps, 1, seeds))
    level = 0.9 * IMAGES + seed_effect + rng.normal(0, 3, (sweeps, variants, seeds))
    acc = _top1(np.clip(np.rint(level), 0, IMAGES))
    pairs = grid_pairs(shape)
    return acc[:, pairs[:, 0]] - acc[:, pairs[:, 1]]


def wrong_line_rate(diffs: np.ndarray, method: str) -> float:
    """The share of simulated reports with at least one better/worse line (all wrong: no
    variant differs), their verdicts' p-values corrected together by ``method``."""
    p = paired_p(diffs)
    return float((p <= thresholds(p, method)).any(-1).mean())


# --- closed forms ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 5, 8, 12])
def test_signflip_p_of_identical_differences_is_two_of_two_to_the_n(n):
    assert signflip_p(np.full(n, 0.28)) == 2 / 2**n
    assert signflip_p(np.zeros(n)) == 1.0


def test_signflip_p_counts_the_flips_at_least_as_extreme_by_hand():
    # 1, 2, 4: |sum| 7 for +++ and ---, the next largest 5 (flip the 1): p = 2/8
    assert signflip_p(np.array([1.0, 2.0, 4.0])) == 0.25
    # 1, 1, -1, 3: sum 4; flipping a subset S gives 4 - 2 sum(S), at least 4 in size where
    # sum(S) <= 0 or >= 4: the empty set, {-1}, the two {1, -1}, the two {1, 3}, {1, 1, 3}
    # and all four: 8 of 16
    assert signflip_p(np.array([1.0, 1.0, -1.0, 3.0])) == 8 / 16


def test_float32_noise_does_not_break_a_tie():
    # the same +1 image read back from float32 at three accuracy levels: one difference
    a, b = _top1(np.array([301, 321, 341])), _top1(np.array([300, 320, 340]))
    assert len(set(a - b)) > 1  # float32 makes them unequal to the last bit
    assert signflip_p(a - b) == 0.25 and difference(dict(enumerate(a)),
                                                   dict(enumerate(b))).same


def test_signflip_interval_excludes_zero_exactly_where_p_is_at_most_alpha():
    rng = np.random.default_rng(1)
    for n, alpha in itertools.product((6, 8, 10), (0.05, 0.0125, 0.2)):
        diffs = _top1(rng.integers(-3, 6, (40, n)) + 300) - _top1(np.full((40, n), 300))
        for row, p in zip(diffs, signflip_p(diffs), strict=True):
            ci = signflip_interval(row, alpha)
            assert ci is not None or p > alpha  # too few pairs for the level: no verdict
            if ci is not None:
                assert (ci[0] > 0 or ci[1] < 0) == (p <= alpha), (row, alpha, p, ci)


def test_needed_pairs_is_the_first_n_whose_smallest_p_reaches_alpha():
    assert [needed_pairs(a) for a in (0.05, 0.05 / 4, 0.05 / 24)] == [6, 8, 10]
    for a in (0.05, 0.01, 0.003):
        n = needed_pairs(a)
        assert 2 / 2**n <= a < 2 / 2 ** (n - 1)


def test_paired_t_test_above_sixteen_pairs_matches_scipy():
    from scipy import stats

    d = np.random.default_rng(2).normal(0.3, 1.0, 20)
    assert paired_p(d) == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue)
    assert paired_p(np.full(20, 0.5)) == 2.0**-19  # no spread: the exact 2/2^n, not 0


def test_fisher_rates_of_three_diverged_against_none():
    r = rates(3, 3, 0, 3)
    assert r.p == pytest.approx(2 / math.comb(6, 3)) and r.min_p == pytest.approx(0.1)
    assert r.outcome == "too few runs for a verdict at α=0.05: need 4 each"
    assert rates(5, 5, 0, 5).outcome == "diverges more often"


def test_holm_thresholds_agree_with_statsmodels_rejections():
    from statsmodels.stats.multitest import multipletests

    # multipletests runs gc.collect on every call: a few dozen reports, not thousands
    rng = np.random.default_rng(3)
    for method in ("holm", "fdr_bh"):
        for _ in range(4):
            ps = list(rng.choice([1e-4, 0.004, 0.01, 0.0125, 0.02, 0.03, 0.2, 0.7],
                                 rng.integers(1, 9)))
            adjusted, limits = correct(ps, method)
            reject = multipletests(ps, alpha=ALPHA, method=method)[0]
            assert [p <= t for p, t in zip(ps, limits, strict=True)] == list(reject)
            assert [a <= ALPHA for a in adjusted] == list(reject)


def test_an_interval_that_excludes_zero_never_prints_a_zero_bound():
    for low, high in ((0.04, 1.2), (-1.2, -0.004), (0.0003, 0.5), (-2.0, -0.049)):
        d = Difference(0.5, "paired", 3, 3, 3, low, high, 0.01)
        shown = interval(d).strip("[]").split(", ")
        assert float(shown[0]) > 0 or float(shown[1]) < 0, shown
        assert not any(s in ("0.0", "-0.0") for s in shown), shown
    assert sign_digits(0.04, 1.2) == 2 and sign_digits(0.5, 1.2) == 1


# --- simulations: no true difference ---------------------------------------------------------

SHAPES = {"2x2": (2, 2), "4x2": (4, 2), "residual_vs_depth": (4, 4)}
SWEEPS = 2000
MARGIN = 3 * math.sqrt(ALPHA * (1 - ALPHA) / SWEEPS)  # Monte-Carlo: 3 standard errors


@pytest.mark.parametrize("name", list(SHAPES))
def test_holm_holds_a_reports_chance_of_any_wrong_line_to_alpha(name):
    shape = SHAPES[name]
    seeds = needed_pairs(ALPHA / len(grid_pairs(shape))) + 1  # enough for verdicts to happen
    diffs = null_sweeps(shape, seeds, SWEEPS, np.random.default_rng(10))
    assert wrong_line_rate(diffs, "holm") <= ALPHA + MARGIN


def test_no_certain_line_under_no_difference_on_three_seeds():
    # whole-image top-1 of a small test set: equal differences on all three seeds are common
    diffs = null_sweeps((2, 2), 3, 500, np.random.default_rng(11)).reshape(-1, 3)
    same = 0
    for row in diffs:
        d = difference(dict(enumerate(row)), dict.fromkeys(range(3), 0.0))
        same += d.same
        assert d.p >= 0.25 and d.low is None and d.outcome.startswith("too few seeds")
    assert same > 10  # the case the old shortcut called certain did occur


def test_paired_t_test_above_the_exact_range_holds_alpha_per_line():
    diffs = null_sweeps((2, 2), 20, SWEEPS, np.random.default_rng(12)).reshape(-1, 20)
    rate = float((paired_p(diffs) <= ALPHA).mean())
    assert rate <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / len(diffs))
