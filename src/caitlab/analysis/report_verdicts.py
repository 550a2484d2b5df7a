"""The report's verdict lines: one question each (one key changed, the others held), its
difference with interval and p-value, the runs it could not count, a line of its own where
the two arms diverge at different rates, the questions it cannot answer and why, and the
correction that holds all of a report's verdicts together to its error rate."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from caitlab.analysis.report_runs import Variant
from caitlab.analysis.stats import (
    ALPHA,
    CORRECTIONS,
    MIN_SEEDS,
    Difference,
    Rates,
    correct,
    difference,
    needed_pairs,
    rates,
)
from caitlab.status import Status

DEFAULT = "(default)"  # the value of a key a variant did not set


def shown(key: str, value: str) -> str:
    """A value as a verdict names it: a config choice by its name (``layerscale``,
    ``cait_tiny``), any other value with its key (``embed_dim=64``, ``compile=true``)."""
    choice = key in ("model", "data") or "/" in key or (
        "." not in key and not _scalar(value))
    return value if choice else f"{key.replace('/', '.').split('.')[-1]}={value}"


def _scalar(value: str) -> bool:
    if value.lower() in ("true", "false", "null", DEFAULT):
        return True
    try:
        float(value)
    except ValueError:
        return False
    return True


def format_p(p: float | None) -> str:
    if p is None:
        return ""
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def sign_digits(*values: float | None, digits: int = 1) -> int:
    """The fewest decimals (at least ``digits``) at which no non-zero value of ``values``
    prints as 0: an interval that excludes 0 never reads ``[0.0, ...]`` or ``[-0.0, ...]``."""
    for x in values:
        while x and digits < 12 and float(f"{x:.{digits}f}") == 0:
            digits += 1
    return digits


def number(x: float, digits: int, sign: bool = False) -> str:
    """``x`` at ``digits`` decimals; a zero without a sign (never ``-0.0``)."""
    text = f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"
    return text.lstrip("+-") if float(text) == 0 else text


def interval(d: Difference, digits: int = 1) -> str:
    """``[low, high]`` with its level where that is not the nominal 95%, at the digits that
    keep its bounds' signs."""
    assert d.low is not None and d.high is not None  # asked for where there is one
    digits = sign_digits(d.low, d.high, digits=digits)
    text = f"[{number(d.low, digits)}, {number(d.high, digits)}]"
    if abs(d.alpha - ALPHA) > 1e-12:
        text += f" {100 * (1 - d.alpha):.3g}% CI"
    return text


# --- the runs behind each side ------------------------------------------------------------------


def states(variant: Variant, values: dict[Any, float]) -> dict[str, int]:
    """How many of the variant's runs ended each way: ``counted`` (a finite value of the
    metric), ``diverged``, ``failed``, ``running``... and ``completed without a value``."""
    out: dict[str, int] = {"counted": len(values)}
    for run in variant.runs:
        if run.status == Status.COMPLETED:
            continue
        out[run.status] = out.get(run.status, 0) + 1
    missing = sum(r.status == Status.COMPLETED for r in variant.runs) - len(values)
    if missing > 0:
        out["completed without a value"] = missing
    return {k: n for k, n in out.items() if n}


def _not_counted(name: str, counts: dict[str, int]) -> str:
    total = sum(counts.values())
    return ", ".join(f"{name}: {n} of {total} {state}" for state, n in counts.items()
                     if state != "counted")


def _why(name: str, counts: dict[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return f"no {name} run"
    if len(counts) == 1:
        state = next(iter(counts))
        return f"every {name} run {state} ({total} of {total})"
    return f"no {name} run counts ({_not_counted(name, counts).split(': ', 1)[1]})"


# --- a verdict ------------------------------------------------------------------------------------


@dataclass
class Verdict:
    key: str
    value: str
    base: str
    context: dict[str, str]
    data: str | None
    difference: Difference | None  # None: a divergence line, or a question not answered
    macs_ratio: float | None = None
    stage: str | None = None  # a chain's stage: its runs are compared among themselves
    divergence: Rates | None = None  # a line on how often the two sides diverged
    why: str | None = None  # a question the runs cannot answer: why not
    not_counted: str = ""  # the runs a side has but the difference could not count
    correction: str = "none"
    # a difference's (variant, baseline) seed -> value; () where there is none
    seeds: tuple[dict, ...] = field(default=(), repr=False, compare=False)

    @property
    def kind(self) -> str:
        return "not answered" if self.why else "divergence" if self.divergence else "accuracy"

    @property
    def test(self) -> Difference | Rates | None:
        return self.divergence or self.difference

    @property
    def answered(self) -> Difference | Rates:
        """Its test, of a question answered (every verdict without ``why`` has one)."""
        assert self.test is not None
        return self.test

    @property
    def outcome(self) -> str:
        return "not answered" if self.why else self.answered.outcome

    def question(self) -> str:
        where = [shown(k, v) for k, v in self.context.items()]
        where += [self.data] if self.data else []
        return ((f"{self.stage}: " if self.stage else "")
                + f"{shown(self.key, self.value)} vs {shown(self.key, self.base)}"
                + (f" ({', '.join(where)})" if where else ""))

    def _p(self, p: float | None, p_adjusted: float | None, test: str = "") -> str:
        tail = [test] if test else []
        if self.correction != "none" and p_adjusted is not None:
            tail.append(f"{CORRECTIONS[self.correction].split(' ')[0]}: "
                        f"{format_p(p_adjusted).removeprefix('p=')}")
        return format_p(p) + (f" ({'; '.join(tail)})" if tail else "")

    def line(self) -> str:
        if self.why:
            return f"{self.question()}: not answered: {self.why}"
        if self.divergence:
            r = self.divergence
            return (f"{self.question()}, divergence: {r.k_variant} of {r.n_variant} vs "
                    f"{r.k_baseline} of {r.n_baseline} runs diverged, "
                    f"{self._p(r.p, r.p_adjusted, 'Fisher')} -> {r.outcome}")
        d = self.difference
        assert d is not None  # answered, not a divergence line
        digits = sign_digits(d.low, d.high)
        text = f"{number(d.delta, digits, sign=True)} pts"
        if d.low is not None:
            text += f" {interval(d)}"
        elif d.same and d.p is not None:
            text += " on every pair alike"
        if d.means_delta is not None:
            text += f" (paired; the means differ by {number(d.means_delta, digits, True)})"
        parts = [text]
        if d.p is not None:
            parts.append(self._p(d.p, d.p_adjusted))
        parts.append(d.seeds())
        if self.not_counted:
            parts.append(self.not_counted)
        text = f"{self.question()}: {', '.join(parts)} -> {d.outcome}"
        if self.macs_ratio is not None and abs(self.macs_ratio - 1) >= 0.005:
            text += f", at {self.macs_ratio:.2f}x the MACs"
        return text


def compare(variant: Variant, partner: Variant, names: tuple[str, str],
            seeds: tuple[dict[Any, float], dict[Any, float]], **facts: Any) -> list[Verdict]:
    """The verdicts of ``variant`` against ``partner`` (``names``: how lines call each;
    ``seeds``: seed -> value of each; ``facts``: the :class:`Verdict` fields that place the
    question): the difference of their values, or why there is none, and, where their runs
    diverged at different rates, a line comparing those rates."""
    counts = (states(variant, seeds[0]), states(partner, seeds[1]))
    d = difference(*seeds)
    out = []
    if d is None:
        why = "; ".join(_why(name, c) for name, c, s in zip(names, counts, seeds, strict=True)
                        if not s)
        out.append(Verdict(**facts, difference=None, why=why))
    else:
        note = "; ".join(filter(None, (_not_counted(n, c) for n, c in
                                       zip(names, counts, strict=True))))
        out.append(Verdict(**facts, difference=d, not_counted=note, seeds=seeds))
    ended = [(c.get(Status.DIVERGED, 0), sum(n for s, n in c.items() if s in
                                             ("counted", Status.DIVERGED,
                                              "completed without a value")))
             for c in counts]
    (k_a, n_a), (k_b, n_b) = ended
    if n_a and n_b and (k_a or k_b) and k_a * n_b != k_b * n_a:
        out.append(Verdict(**{**facts, "macs_ratio": None}, difference=None,
                           divergence=rates(k_a, n_a, k_b, n_b)))
    return out


def apply_correction(verdicts: Iterable[Verdict], method: str = "holm",
                     alpha: float = ALPHA) -> list[Verdict]:
    """``verdicts`` with every p-value of them corrected together (:func:`stats.correct`):
    each difference recomputed at the threshold its verdict is held to, so that its interval
    excludes 0 exactly where the verdict says better or worse."""
    verdicts = list(verdicts)
    ps = {i: p for i, v in enumerate(verdicts)  # index -> p of each verdict with one
          if v.why is None and (p := v.answered.p) is not None}
    adjusted, thresholds = correct(list(ps.values()), method, alpha)
    out = [replace(v, correction=method) for v in verdicts]
    for i, p_adj, t in zip(ps, adjusted, thresholds, strict=True):
        v = out[i]
        if v.divergence is not None:
            out[i] = replace(v, divergence=replace(v.divergence, alpha=t, p_adjusted=p_adj))
        else:
            d = difference(v.seeds[0], v.seeds[1], alpha=t)
            assert d is not None  # the seeds gave one at the nominal threshold
            out[i] = replace(v, difference=replace(d, p_adjusted=p_adj))
    return out


def method_text(verdicts: list[Verdict], method: str, alpha: float = ALPHA) -> str:
    """How the verdicts are held together, for the report's heading."""
    m = sum(v.why is None and v.answered.p is not None for v in verdicts)
    if m == 0:
        return "none could be tested yet, so none is held to a threshold"
    if method == "none":
        return (f"no correction: each verdict at α={alpha:g} on its own, so about "
                f"{alpha * m:.2g} of these {m} lines say better or worse by chance alone")
    what = ("the chance of any wrong better/worse line" if method == "holm"
            else "the expected share of wrong better/worse lines")
    return (f"{CORRECTIONS[method]} over {m} verdicts: {what} is held to {alpha:g}; "
            "each interval is at the level its verdict is held to")


def few_seeds_note(differences: Iterable[Difference], verdicts: list[Verdict]) -> str | None:
    """What the seeds lack where a difference is too few for a verdict: 3 seeds a side for
    any interval, and the paired seeds the exact test needs to reach the threshold."""
    notes = []
    tests = [*differences, *(v.difference for v in verdicts if v.difference)]
    if any(d.test == "too few seeds" for d in tests):
        notes.append(f"intervals and p-values need {MIN_SEEDS} seeds or more on each side")
    short = [d for d in tests if d.p is not None and d.min_p > d.alpha
             and d.method == "exact sign-flip"]
    if short:
        need = max(needed_pairs(d.alpha) for d in short)
        n = max(d.n for d in short)
        notes.append(f"with n paired seeds the exact test's smallest p is 2/2^n "
                     f"({2 ** (1 - n):.2g} for {n}), so a verdict at the threshold these are "
                     f"held to needs {need} paired seeds")
        return "; ".join(notes) + f": rerun with e.g. seed={','.join(map(str, range(need)))}"
    if notes:
        return notes[0] + ": rerun with e.g. seed=0,1,2,3,4,5"
    return None
