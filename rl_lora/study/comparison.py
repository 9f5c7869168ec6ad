"""The statistics of a best-vs-best comparison: each method's best LR, and a verdict with a stated margin.

Two sets of seeds keep the choice and the judgement apart. **Selection** runs (every LR of a method's grid)
pick the method's best LR by a score fixed before the runs: the headline metric averaged over each run's
last ``last`` evaluations, then over seeds. **Confirmation** runs (other seeds, at the best LR) are the
only ones the verdict reads: the gap to full, its Welch t confidence interval (90%, two-sided: the
interval of two one-sided tests at 5%), and an equivalence verdict against a margin ``m`` stated up front:

- within ±m of full: the whole interval lies inside (-m, +m);
- below full / above full: the whole interval lies on one side of zero (and "by more than m" past it);
- inconclusive otherwise, with about how many seeds per method would decide it (the interval narrows as
  1/sqrt(seeds); an estimate, not a promise).

Every function here is pure: figures in, figures out; drawing them is rl_lora.study.report's job.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

LEVEL = 0.90  # two-sided confidence of the gap's interval
MAX_SEEDS_SAID = 200  # past this, "more than 200 seeds" (the gap is essentially at the margin)


def selection_score(curve: list[tuple[int, float]], last: int) -> float | None:
    """The mean of the last ``last`` evaluations of a run's held-out curve [(step, value)], None if empty."""
    if not curve:
        return None
    tail = [value for _, value in sorted(curve)[-last:]]
    return statistics.fmean(tail)


@dataclass(frozen=True)
class LrChoice:
    """One method's selection: mean score per LR over the selection seeds, and the best LR."""

    scores: dict[float, list[float]]
    best_lr: float
    at_edge: bool  # the best LR is the grid's smallest or largest: the optimum may lie outside it

    def mean(self, lr: float) -> float:
        return statistics.fmean(self.scores[lr])


def choose_lr(scores: dict[float, list[float]], higher_is_better: bool = True) -> LrChoice:
    """The LR with the best mean score (ties: the smaller LR). LRs without any finished run are ignored."""
    scored = {lr: values for lr, values in scores.items() if values}
    if not scored:
        raise ValueError("no LR of the grid has a finished selection run")
    sign = 1.0 if higher_is_better else -1.0
    best = max(sorted(scored), key=lambda lr: sign * statistics.fmean(scored[lr]))
    grid = sorted(scores)
    return LrChoice(scored, best, len(grid) > 1 and best in (grid[0], grid[-1]))


def t_cdf(x: float, df: float) -> float:
    """Student's t distribution function (Simpson's rule on the density; |error| < 1e-7 for df >= 1)."""
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    # Substitute t = tan(u) so the heavy tail of small df integrates on a finite interval.
    upper, n = math.atan(x), 600
    h = upper / n
    total = 0.0
    for i in range(n + 1):
        u = i * h
        weight = 1 if i in (0, n) else (4 if i % 2 else 2)
        total += weight * density(math.tan(u)) / math.cos(u) ** 2
    return 0.5 + total * h / 3


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on t_cdf)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(45):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


@dataclass(frozen=True)
class Gap:
    """method - full over confirmation seeds, with its Welch t interval (None with fewer than 2 seeds a side)."""

    gap: float
    low: float | None
    high: float | None
    n_method: int
    n_full: int

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2


def welch_gap(method: list[float], full: list[float], level: float = LEVEL, floor_sd: float | None = None) -> Gap:
    """The gap of means and its Welch-Satterthwaite t interval at ``level`` (two-sided).

    ``floor_sd``: each side's standard deviation is taken as at least this (the metric's resolution: seeds that
    all scored the same could still differ by one step of it), so seeds without spread give an interval of
    non-zero width instead of a point. Without a floor, no spread on either side gives a zero-width interval.
    """
    gap = statistics.fmean(method) - statistics.fmean(full)
    if len(method) < 2 or len(full) < 2:
        return Gap(gap, None, None, len(method), len(full))
    floor = floor_sd or 0.0
    va = max(statistics.variance(method), floor**2) / len(method)
    vb = max(statistics.variance(full), floor**2) / len(full)
    se = math.sqrt(va + vb)
    if se == 0:
        return Gap(gap, gap, gap, len(method), len(full))
    df = (va + vb) ** 2 / (va**2 / (len(method) - 1) + vb**2 / (len(full) - 1))
    half = t_quantile(0.5 + level / 2, df) * se
    return Gap(gap, gap - half, gap + half, len(method), len(full))


def equivalence_bound(gap: Gap) -> float | None:
    """The smallest margin the gap's interval would pass as "within ±m of full": max(|low|, |high|) (any margin
    above it passes; the interval is TOST's, so this is the equivalence bound at 5% each side). None without an
    interval."""
    if gap.low is None or gap.high is None:
        return None
    return max(abs(gap.low), abs(gap.high))


def seeds_to_decide(gap: Gap, margin: float) -> int | None:
    """About how many seeds per method would make the interval decide (equivalence or a difference).

    The interval's half-width shrinks as 1/sqrt(n); a decision needs it below |gap| (a difference) or below
    margin - |gap| (equivalence). None when the interval is missing or already decides.
    """
    half = gap.half_width
    if half is None or half == 0:
        return None
    needed_width = max(abs(gap.gap), margin - abs(gap.gap))
    if needed_width <= 0:
        return MAX_SEEDS_SAID + 1
    n = min(gap.n_method, gap.n_full)
    return min(MAX_SEEDS_SAID + 1, max(n + 1, math.ceil(n * (half / needed_width) ** 2)))


def verdict(gap: Gap, margin: float, higher_is_better: bool = True, margin_text: str | None = None) -> str:
    """The equivalence verdict for ``gap`` (method - full) at ``margin``, in words (``margin_text``: how to
    write the margin, e.g. "5 points")."""
    if gap.low is None or gap.high is None:
        return "one seed on a side: no interval, no verdict"
    m = margin_text or f"{margin:g}"
    low, high = gap.low, gap.high
    if -margin < low and high < margin:
        side = ""
        if high < 0 or low > 0:
            worse = high < 0 if higher_is_better else low > 0
            side = f" (and {_side(worse, higher_is_better).removesuffix(' full')} it)"
        return f"within ±{m} of full{side}"
    if high < 0 or low > 0:
        worse = high < 0 if higher_is_better else low > 0
        word = _side(worse, higher_is_better)
        beyond = (high < -margin) if high < 0 else (low > margin)
        return word + (f" by more than {m}" if beyond else "")
    needed = seeds_to_decide(gap, margin)
    if needed is None or needed > MAX_SEEDS_SAID:
        return f"inconclusive: the gap sits at the margin; more than {MAX_SEEDS_SAID} seeds per method"
    return f"inconclusive: about {needed} seeds per method would decide it"


def _side(worse: bool, higher_is_better: bool) -> str:
    if higher_is_better:
        return "below full" if worse else "above full"
    return "worse than full" if worse else "better than full"
