"""How often a report holds at least one wrong better/worse line when no variant differs.

For each grid shape the shipped experiments have (2x2, 4x2, residual_vs_depth's 4x4) and a
few seed counts, simulates null sweeps (every variant the same; top-1 in whole images of a
360-image test set, float32, as caitlab-report reads it) and prints the per-report rate of
>= 1 wrong line under

- the previous rule: a paired t-test per line at 5%, a zero-spread difference taken as
  certain (p=0), no correction across lines;
- caitlab-report's rule: the exact sign-flip test (a t-test above 16 pairs), uncorrected,
  with Holm (the default) and with Benjamini-Hochberg.

Run from the checkout: ``.venv/bin/python scripts/sim_verdict_rates.py`` (a few seconds).
The simulator is the one tests/test_stats.py checks the error rates with.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from caitlab.analysis.stats import paired_p, thresholds  # noqa: E402
from test_stats import SHAPES, grid_pairs, null_sweeps  # noqa: E402

SWEEPS = 4000
ALPHA = 0.05


def previous_rule_p(d: np.ndarray) -> np.ndarray:
    """p of the paired t-test per line, p=0 where every pair differs alike (as before)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # ties: scipy warns, p is nan
        p = stats.ttest_1samp(d, 0.0, axis=-1).pvalue
    flat = d.var(-1) == 0
    return np.where(flat, np.where(d.mean(-1) == 0, 1.0, 0.0), np.nan_to_num(p, nan=0.0))


def main() -> None:
    print(f"{SWEEPS} null sweeps per row; rate of reports with >= 1 wrong better/worse line")
    print("| grid (lines) | seeds | previous rule | wrong lines/report | exact, uncorrected "
          "| exact + Holm | exact + BH |")
    print("|---|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        for seeds in (3, 5, 10, 12):
            d = null_sweeps(shape, seeds, SWEEPS, np.random.default_rng(seeds))
            old = previous_rule_p(d) <= ALPHA
            new = paired_p(d)
            after = {m: (new <= thresholds(new, m)).any(-1).mean()
                     for m in ("none", "holm", "fdr_bh")}
            print(f"| {name} ({len(grid_pairs(shape))}) | {seeds} | {old.any(-1).mean():.3f} "
                  f"| {old.sum(-1).mean():.2f} | {after['none']:.3f} | {after['holm']:.3f} "
                  f"| {after['fdr_bh']:.3f} |")


if __name__ == "__main__":
    main()
