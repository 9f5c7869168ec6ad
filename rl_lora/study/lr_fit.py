"""A method's best LR as a fitted optimum, with a bootstrap interval over seeds, next to the grid's best.

A grid's best LR is only as fine as the grid's step, and on a flat curve two seeds can move it a whole step.
The fitted optimum is the top of a parabola in log-LR through the grid's non-collapsed points, every seed's
score one point of the fit:

- **collapsed**: a grid LR whose mean score gave back more than half of the best LR's gain over the runs'
  first evaluation (``start``); such points sit on the far side of a cliff, not on the parabola, and are left
  out. Without a start score nothing is left out.
- **no optimum**: fewer than 3 LRs left, a parabola that opens the wrong way, or a top outside the fitted
  LRs' range (an extrapolation, not a measurement).
- **interval**: each LR's seeds resampled with replacement (each LR on its own), the parabola refitted,
  ``resamples`` times; the central ``LEVEL`` share of the tops (and of the ratio of two methods' tops, the
  two resampled independently). Resamples without an optimum are counted, and the interval is given only
  when at least ``LEVEL`` of them have one. With 2 seeds per LR a resample takes one of three means per LR,
  so read the interval as coarse.

Pure figures in, figures out (numpy only, no torch).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

from rl_lora.study.comparison import LEVEL

RESAMPLES = 2000


@dataclass(frozen=True)
class Fit:
    """One method's fitted optimum: ``lr`` None when there is none (``why`` says why)."""

    lr: float | None
    fitted: tuple[float, ...]  # the LRs the parabola went through
    collapsed: tuple[float, ...]  # the LRs left out as collapsed
    why: str = ""


@dataclass(frozen=True)
class Interval:
    """A bootstrap interval: ``low``/``high`` None when fewer than LEVEL of the resamples had an optimum."""

    low: float | None
    high: float | None
    defined: float  # the share of resamples with an optimum


def collapsed_lrs(scores: dict[float, list[float]], start: float | None, higher_is_better: bool = True) -> set[float]:
    """The LRs whose mean score gave back more than half of the best LR's gain over ``start``."""
    means = {lr: statistics.fmean(v) for lr, v in scores.items() if v}
    if start is None or not means:
        return set()
    sign = 1.0 if higher_is_better else -1.0
    best = max(sign * m for m in means.values())
    gain = best - sign * start
    if gain <= 0:
        return set()
    return {lr for lr, m in means.items() if sign * m < sign * start + gain / 2}


def _top(xs: np.ndarray, ys: np.ndarray, sign: float) -> float | str:
    """log-LR of the parabola's top through (xs, ys), or why there is none."""
    a, b, _ = np.polyfit(xs, sign * ys, 2)
    if a >= 0:
        return "the fitted parabola has no top (it opens upward or is flat)"
    top = -b / (2 * a)
    if not xs.min() <= top <= xs.max():
        return "the fitted top lies outside the fitted LRs (an extrapolation)"
    return float(top)


def _points(scores: dict[float, list[float]], keep: list[float]) -> tuple[np.ndarray, np.ndarray]:
    xs = [math.log(lr) for lr in keep for _ in scores[lr]]
    ys = [v for lr in keep for v in scores[lr]]
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def fit_optimum(scores: dict[float, list[float]], start: float | None = None, higher_is_better: bool = True) -> Fit:
    """The top of a parabola in log-LR through every seed's score at the non-collapsed LRs."""
    scored = {lr: v for lr, v in scores.items() if v}
    dropped = collapsed_lrs(scored, start, higher_is_better)
    keep = sorted(lr for lr in scored if lr not in dropped)
    if len(keep) < 3:
        return Fit(None, tuple(keep), tuple(sorted(dropped)), f"{len(keep)} non-collapsed LR(s); a parabola needs 3")
    top = _top(*_points(scored, keep), 1.0 if higher_is_better else -1.0)
    if isinstance(top, str):
        return Fit(None, tuple(keep), tuple(sorted(dropped)), top)
    return Fit(math.exp(top), tuple(keep), tuple(sorted(dropped)))


def _resampled_tops(scores: dict[float, list[float]], fit: Fit, higher_is_better: bool, resamples: int,
                    rng: np.random.Generator) -> list[float | None]:
    """log-LR tops of ``resamples`` refits, each LR's seeds drawn with replacement (None: no top)."""
    sign = 1.0 if higher_is_better else -1.0
    keep = list(fit.fitted)
    if len(keep) < 3:
        return [None] * resamples
    arrays = {lr: np.asarray(scores[lr], dtype=float) for lr in keep}
    xs = np.concatenate([np.full(len(arrays[lr]), math.log(lr)) for lr in keep])
    tops: list[float | None] = []
    for _ in range(resamples):
        ys = np.concatenate([rng.choice(arrays[lr], size=len(arrays[lr]), replace=True) for lr in keep])
        top = _top(xs, ys, sign)
        tops.append(None if isinstance(top, str) else top)
    return tops


def _interval(values: list[float | None]) -> Interval:
    defined = [v for v in values if v is not None]
    share = len(defined) / len(values) if values else 0.0
    if not defined or share < LEVEL:
        return Interval(None, None, share)
    tail = (1 - LEVEL) / 2
    low, high = np.quantile(np.asarray(defined), [tail, 1 - tail])
    return Interval(float(math.exp(low)), float(math.exp(high)), share)


def optimum_interval(scores: dict[float, list[float]], fit: Fit, higher_is_better: bool = True,
                     resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """The bootstrap interval of one method's fitted optimum (see the module's docstring)."""
    rng = np.random.default_rng(seed)
    return _interval(_resampled_tops(scores, fit, higher_is_better, resamples, rng))


def ratio_interval(scores: dict[float, list[float]], fit: Fit, full_scores: dict[float, list[float]],
                   full_fit: Fit, higher_is_better: bool = True, resamples: int = RESAMPLES,
                   seed: int = 0) -> Interval:
    """The bootstrap interval of one method's fitted optimum over full's, the two resampled independently."""
    rng = np.random.default_rng(seed)
    mine = _resampled_tops(scores, fit, higher_is_better, resamples, rng)
    full = _resampled_tops(full_scores, full_fit, higher_is_better, resamples, rng)
    return _interval([None if a is None or b is None else a - b for a, b in zip(mine, full, strict=True)])
