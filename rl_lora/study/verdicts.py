"""The comparison part of the sweep report: each arm's best LR, the best-vs-best verdict, the LR ratio.

It reads the sweep's protocol from ``sweep.json`` (which seeds selected LRs, which confirm, the selection
score and the margin), scores every run the same way (rl_lora/study/comparison.py), and returns Markdown lines
and one plot: the headline metric against LR, one curve per arm with its seed band, best LR marked.
Sweeps without an LR grid (and sweeps from before the protocol existed) get the same verdict table, with
a line saying that each method ran at one untuned LR.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from rl_lora.estimate.lr_rule import default_multiplier
from rl_lora.study.comparison import LEVEL, choose_lr, equivalence_bound, selection_score, verdict, welch_gap
from rl_lora.study.lr_fit import Fit, Interval, fit_optimum, optimum_interval, ratio_interval
from rl_lora.study.records import read_manifests
from rl_lora.study.sweep_plan import log_step
from rl_lora.tasks.base import Metric

DEFAULT_RATE_MARGIN = 0.05  # 5 points, for metrics declared rates (Metric.unit "rate")
DEFAULT_RELATIVE_MARGIN = 0.05  # for a metric with units: 5% of how far training moved full's score


@dataclass(frozen=True)
class Protocol:
    selection_seeds: frozenset[int] = frozenset()
    confirmation_seeds: frozenset[int] | None = None
    select_last: int = 1
    margin: float | None = None

    @property
    def has_grid(self) -> bool:
        return bool(self.selection_seeds)


def read_protocol(sweep_dir: Path) -> Protocol:
    """The protocol of every sweep run into the folder (rl_lora/study/records.py keeps their manifests): the
    selection seeds, rule and margin the first registered (later sweeps may not change them), and the
    confirmation seeds of all of them."""
    manifests = read_manifests(sweep_dir)
    if not manifests:
        return Protocol()
    manifest = manifests[0]
    rule = manifest.get("selection_rule") or {}
    seeds = {s for m in manifests for s in (m.get("seeds") or [])}
    return Protocol(frozenset(manifest.get("selection_seeds") or []), frozenset(seeds) if seeds else None,
                    int(rule.get("last", 2 if manifest.get("selection_seeds") else 1)), manifest.get("margin"))


@dataclass
class ArmRuns:
    """One arm's runs: selection runs by LR, confirmation runs, and the scores."""

    key: tuple[str, str, int]
    label: str
    rank: int | str
    steps: int
    selection: dict[float, list[Any]] = field(default_factory=dict)
    confirmation: dict[float, list[Any]] = field(default_factory=dict)
    best_lr: float | None = None
    at_edge: bool = False

    @property
    def is_full(self) -> bool:
        return self.rank == "full"

    def confirmed(self) -> tuple[float | None, list[Any]]:
        """(LR, runs) the verdict reads: the confirmation runs at the best LR (or at the only LR they have)."""
        if self.best_lr is not None and self.best_lr in self.confirmation:
            return self.best_lr, self.confirmation[self.best_lr]
        if len(self.confirmation) == 1:
            return next(iter(self.confirmation.items()))
        return None, []


def arm_key(summary: dict[str, Any]) -> tuple[str, str, int]:
    """(method, layer set, batch size) of a run: the arm of the comparison it belongs to."""
    return summary["method"], summary.get("lora_targets", "all"), int(summary.get("batch_size") or 0)


def arm_label(arm: tuple[str, str, int], runs: list[Any]) -> str:
    """'lora-r1', plus the layer set and 'b<batch>' where the sweep's runs differ in them."""
    method, layers, batch = arm
    lora_layers = {arm_key(r.summary)[1] for r in runs if r.summary["method"] != "full"}
    batches = {arm_key(r.summary)[2] for r in runs}
    label = method
    if len(lora_layers) > 1 and method != "full":
        label += f" {layers}"
    if len(batches) > 1:
        label += f" b{batch}"
    return label


def score(run: Any, metric: str, last: int) -> float | None:
    curve = [(r["step"], r[f"eval/{metric}"]) for r in run.records if r.get(f"eval/{metric}") is not None]
    return selection_score(curve, last)


def collect(runs: list[Any], protocol: Protocol, metric: str, higher_is_better: bool,
            label: Any) -> list[ArmRuns]:
    """Runs sorted into arms and phases; each arm's best LR chosen from its selection runs."""
    arms: dict[tuple[str, str, int], ArmRuns] = {}
    for run in runs:
        key = arm_key(run.summary)
        arm = arms.setdefault(key, ArmRuns(key, label(key, runs), run.summary["rank"], int(run.summary["steps"])))
        seed, lr = int(run.summary["seed"]), float(run.summary["lr"])
        if seed in protocol.selection_seeds:
            arm.selection.setdefault(lr, []).append(run)
        elif protocol.confirmation_seeds is None or seed in protocol.confirmation_seeds:
            arm.confirmation.setdefault(lr, []).append(run)
    for arm in arms.values():
        if arm.selection:
            scores = {lr: [x for x in (score(r, metric, protocol.select_last) for r in rs) if x is not None]
                      for lr, rs in arm.selection.items()}
            if any(scores.values()):
                choice = choose_lr(scores, higher_is_better)
                arm.best_lr, arm.at_edge = choice.best_lr, choice.at_edge
    return sorted(arms.values(), key=lambda a: (a.is_full, 0 if a.is_full else float(a.rank), a.label))


def resolve_margin(protocol: Protocol, metric: Any, fulls: list[ArmRuns],
                   scores: dict[tuple[str, str, int], list[float]]) -> tuple[float | None, str]:
    """(margin in the metric's units, where it comes from), by the metric's declared unit, never its values.

    Registered (sweep.json, ``--margin``): as given, in the metric's units. Default for a rate: 5 points. Default
    for a metric with units: 5% of how far training moved full's score (its confirmation runs' score minus their
    first evaluation), so a metric centred on 0 gets a margin in proportion to its movement (of |full's score|
    where no first evaluation is recorded). None when full has no score to take it from.
    """
    if protocol.margin is not None:
        return protocol.margin, "registered in sweep.json before the runs"
    if metric.is_rate:
        return DEFAULT_RATE_MARGIN, "5 points, the default for rates"
    finals = [v for a in fulls for v in scores[a.key]]
    starts = [r.summary[f"start_{metric.name}"] for a in fulls for r in a.confirmed()[1]
              if isinstance(r.summary.get(f"start_{metric.name}"), (int, float))]
    if not finals:
        return None, "no full-parameter score to take the default from"
    best, start = statistics.fmean(finals), statistics.fmean(starts) if starts else None
    margin = Metric(metric.name, metric.higher_is_better, unit=metric.unit).margin_in_units(
        DEFAULT_RELATIVE_MARGIN, best, start)
    moved = start is not None and best != start
    return margin, ("5% of how far training moved full's score, the default for a metric with units" if moved
                    else "5% of |full's score|, the default for a metric with units when full's first "
                         "evaluation is unknown")


def floor_sd(metric: Any) -> float | None:
    """The spread floor of a score (rl_lora.study.comparison.welch_gap): the metric's declared resolution (a
    rate over a fixed held-out set: 1 / its size). None when the metric declares none."""
    return metric.resolution if getattr(metric, "resolution", None) else None


def header_lines(metric: Any, margin_text: str, margin_source: str, what: str) -> list[str]:
    """What the verdict table is: the score, the interval's level and the test it is, and the margin."""
    pct = int(LEVEL * 100)
    floor = floor_sd(metric)
    unit = " points" if metric.is_rate else (f" {metric.unit}" if metric.unit else "")
    scale = 100 if metric.is_rate else 1
    floor_text = (f"Each side's seed spread is floored at the metric's resolution ({floor * scale:.2g}{unit}: one "
                  "held-out item), so seeds that all scored the same still give an interval of non-zero width."
                  if floor else "The metric declares no resolution, so seeds without spread give a zero-width "
                                "interval (marked in the table).")
    return [
        f"Score: {metric.label}, {what}. Gap: method - full (at the same batch size). Interval: the gap's "
        f"{pct}% two-sided Welch t interval (Welch-Satterthwaite degrees of freedom). \"within ±m of full\" is "
        f"an equivalence test, two one-sided Welch t tests (TOST) at {(1 - LEVEL) / 2:.0%} each side; "
        f"\"below\"/\"above full\" is a two-sided Welch t test at {1 - LEVEL:.0%} (the interval excludes 0). "
        f"{floor_text}", "",
        f"Margin ±{margin_text} ({margin_source}). The equivalence bound is the smallest margin an arm's interval "
        "would pass as \"within\" (the larger end of its interval, in absolute value): a verdict is only as "
        "strong as its bound.", "",
    ]


def ceiling_lines(metric: Any, margin: float, fulls: list[ArmRuns],
                  scores: dict[tuple[str, str, int], list[float]]) -> list[str]:
    """For a rate near its ceiling, what the margin admits measured against full's error rate."""
    if not metric.is_rate or not metric.higher_is_better:
        return []
    out = []
    for full in fulls:
        values = scores[full.key]
        error = 1 - statistics.fmean(values) if values else None
        if error is None or error <= 0 or error > 0.2:
            continue
        where = f" at batch {full.key[2]}" if len(fulls) > 1 else ""
        out.append(f"Near the ceiling{where}: full's error rate is {100 * error:.1f} points, so a margin of "
                   f"{100 * margin:g} points admits up to {(error + margin) / error:.1f}x full's error rate; read "
                   "each arm's equivalence bound against it.")
    return [*out, ""] if out else []


def verdict_lines(arms: list[ArmRuns], protocol: Protocol, metric: Any) -> list[str]:
    """The best-vs-best table and the sentences that state its rules, its test and its strength.

    ``metric``: the headline metric with its declared unit (``is_rate``, ``unit``, ``resolution``; see
    rl_lora.tasks.base.Metric): a rate reads in points with a default margin of 5 points; a metric with units
    reads in its units with a default margin of 5% of how far training moved full's score.
    """
    scores = {a.key: [x for x in (score(r, metric.name, protocol.select_last) for r in a.confirmed()[1])
                      if x is not None] for a in arms}
    fulls = {a.key[2]: a for a in arms if a.is_full}
    scale, unit = (100, " points") if metric.is_rate else (1, f" {metric.unit}" if metric.unit else "")
    margin, margin_source = resolve_margin(protocol, metric, list(fulls.values()), scores)
    margin_text = f"{margin * scale:.3g}{unit}" if margin is not None else "n/a"
    what = (f"the mean of each run's last {protocol.select_last} evaluations" if protocol.select_last > 1
            else "each run's final evaluation")
    lines = []
    if not protocol.has_grid:
        lines += ["**One LR per method, not tuned**: every method trained at the LR the recipe and the LR rule give, "
                  "so a gap below can be the LR's as much as the method's. Run the sweep with `--lrs auto` to "
                  "compare each method at its own best LR.", ""]
    else:
        confirming = sorted(protocol.confirmation_seeds or [])
        lines += [f"Best LRs were chosen on selection seeds {sorted(protocol.selection_seeds)}; the verdict reads "
                  f"only the confirmation seeds {confirming}.", ""]
    pct = int(LEVEL * 100)
    lines += [
        *header_lines(metric, margin_text, margin_source, what),
        *(ceiling_lines(metric, margin, list(fulls.values()), scores) if margin is not None else []),
        f"| method | LR | seeds | score (mean ± sd) | gap to full | {pct}% interval | equivalence bound | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    floor = floor_sd(metric)
    for arm in arms:
        values = scores[arm.key]
        lr, _ = arm.confirmed()
        if not values:
            lines.append(f"| {arm.label} | {_lr(lr)} | 0 | n/a | n/a | n/a | n/a | no confirmation run finished |")
            continue
        sd = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        head = f"| {arm.label} | {_lr(lr)} | {len(values)} | {statistics.fmean(values):.3f}{sd} |"
        full = fulls.get(arm.key[2])
        if arm.is_full:
            lines.append(f"{head} — | — | — | baseline |")
        elif full is None or not scores[full.key]:
            lines.append(f"{head} n/a | n/a | n/a | no full-parameter run at this batch size |")
        else:
            gap = welch_gap(values, scores[full.key], floor_sd=floor)
            interval = ("n/a" if gap.low is None or gap.high is None  # both None or neither
                        else f"[{_num(gap.low, metric, '+')}, {_num(gap.high, metric, '+')}]")
            if gap.low is not None and gap.low == gap.high:
                interval += " (no spread: a point)"
            bound = equivalence_bound(gap)
            bound_text = "n/a" if bound is None else f"±{_num(bound, metric)}{unit}"
            said = (verdict(gap, margin, metric.higher_is_better, margin_text) if margin is not None
                    else "no margin: register one with --margin")
            lines.append(f"{head} {_num(gap.gap, metric, '+')}{unit} | {interval} | {bound_text} | {said} |")
    return lines


def selection_scores(arm: ArmRuns, protocol: Protocol, metric: Any) -> dict[float, list[float]]:
    """Each grid LR's selection scores (one per finished selection seed)."""
    return {lr: [x for x in (score(r, metric.name, protocol.select_last) for r in runs) if x is not None]
            for lr, runs in arm.selection.items()}


def start_score(arm: ArmRuns, metric: Any) -> float | None:
    """The mean first evaluation (before any step) of the arm's selection runs, None where none is recorded."""
    starts = [r.summary.get(f"start_{metric.name}") for runs in arm.selection.values() for r in runs]
    numbers = [x for x in starts if isinstance(x, (int, float))]
    return statistics.fmean(numbers) if numbers else None


def _interval_text(interval: Interval, scale: str = "") -> str:
    if interval.low is None or interval.high is None:
        return f"n/a ({interval.defined:.0%} of resamples have a top)"
    return f"{interval.low:.3g}{scale}..{interval.high:.3g}{scale}"


@dataclass(frozen=True)
class ArmFit:
    """One arm's selection scores by LR, its fitted optimum, and that optimum's bootstrap interval (None
    without an optimum)."""

    scores: dict[float, list[float]]
    fit: Fit
    interval: Interval | None


def arm_fit(arm: ArmRuns, protocol: Protocol, metric: Any) -> ArmFit:
    """The fitted optimum of ``arm``'s selection runs (rl_lora/study/lr_fit.py)."""
    scores = selection_scores(arm, protocol, metric)
    fit = fit_optimum(scores, start_score(arm, metric), metric.higher_is_better)
    interval = optimum_interval(scores, fit, metric.higher_is_better) if fit.lr is not None else None
    return ArmFit(scores, fit, interval)


def fit_lines(arms: list[ArmRuns], protocol: Protocol, metric: Any) -> tuple[list[str], dict[Any, ArmFit]]:
    """The fitted-optimum table (rl_lora/study/lr_fit.py) and each arm's fit."""
    pct = int(LEVEL * 100)
    lines = [f"Fitted optimum: the top of a parabola in log-LR through every selection seed's score at the "
             "non-collapsed LRs (collapsed: gave back more than half the best LR's gain over the first "
             f"evaluation); interval: {pct}% bootstrap over seeds, each LR's seeds resampled "
             "(rl_lora/study/lr_fit.py).", "",
             f"| method | grid's best LR | fitted optimum | {pct}% bootstrap interval | LRs fitted | "
             "left out as collapsed |", "|---|---|---|---|---|---|"]
    fits = {}
    for arm in arms:
        fitted = fits[arm.key] = arm_fit(arm, protocol, metric)
        fit = fitted.fit
        dropped = ", ".join(f"{lr:g}" for lr in fit.collapsed) or "none"
        if fit.lr is None or fitted.interval is None:
            lines.append(f"| {arm.label} | {_lr(arm.best_lr)} | none: {fit.why} | n/a | {len(fit.fitted)} | "
                         f"{dropped} |")
            continue
        lines.append(f"| {arm.label} | {_lr(arm.best_lr)} | {fit.lr:.3g} | {_interval_text(fitted.interval)} | "
                     f"{len(fit.fitted)} | {dropped} |")
    return [*lines, ""], fits


def lr_lines(arms: list[ArmRuns], protocol: Protocol, metric: Any) -> list[str]:
    """The selection table (score per LR, best marked), the fitted optima, and the LoRA/full best-LR ratio."""
    grid_arms = [a for a in arms if a.selection]
    if not grid_arms:
        return []
    lines = ["| method | LR | selection seeds | score (mean, min..max) |", "|---|---|---|---|"]
    for arm in grid_arms:
        for lr in sorted(arm.selection):
            values = [x for x in (score(r, metric.name, protocol.select_last) for r in arm.selection[lr])
                      if x is not None]
            mark = " **best**" if lr == arm.best_lr else ""
            figure = f"{statistics.fmean(values):.3f} ({min(values):.3f}..{max(values):.3f})" if values else "n/a"
            lines.append(f"| {arm.label} | {lr:g}{mark} | {len(values)} | {figure} |")
    edges = [a.label for a in grid_arms if a.at_edge]
    lines.append("")
    if edges:
        lines += [f"Best LR at the grid's edge for {', '.join(edges)}: the optimum may lie outside the grid; "
                  "extend it (`--lrs`) before reading the verdict.", ""]
    fitted, fits = fit_lines(grid_arms, protocol, metric)
    lines += fitted
    fulls = {a.key[2]: a for a in grid_arms if a.is_full and a.best_lr}
    pct = int(LEVEL * 100)
    ratio_rows = []
    for arm in grid_arms:
        full = fulls.get(arm.key[2])
        if arm.is_full or full is None or arm.best_lr is None or full.best_lr is None:  # fulls have one
            continue
        step = log_step(sorted(arm.selection))
        fit, full_fit = fits[arm.key].fit, fits[full.key].fit
        if fit.lr is None or full_fit.lr is None:
            fitted_ratio = "n/a (no fitted optimum)"
        else:
            interval = ratio_interval(fits[arm.key].scores, fit, fits[full.key].scores, full_fit,
                                      metric.higher_is_better)
            fitted_ratio = f"{fit.lr / full_fit.lr:.3g}x ({_interval_text(interval, 'x')})"
        ratio_rows.append(f"| {arm.label} | {arm.best_lr:g} | {full.best_lr:g} | {arm.best_lr / full.best_lr:.3g}x | "
                          f"{fitted_ratio} | {default_multiplier(arm.steps):g}x | "
                          f"{f'{step:.2g}x' if step else 'n/a'} |")
    if ratio_rows:
        lines += ["LoRA's best LR over full's (claim 5 of docs/findings.md), next to the LR rule's multiplier; "
                  "the grid's ratio is only as fine as the grid's step, the fitted one comes with its "
                  f"{pct}% bootstrap interval:", "",
                  f"| method | best LR | full's best LR | grid's ratio | fitted ratio ({pct}% interval) | rule | "
                  "grid step |",
                  "|---|---|---|---|---|---|---|",
                  *ratio_rows, ""]
    return lines


def lr_plot(arms: list[ArmRuns], protocol: Protocol, metric: Any, path: Path) -> bool:
    """Score against LR (log x), one curve per arm: mean over selection seeds, band min..max, best LR starred."""
    grid_arms = [a for a in arms if a.selection]
    if not grid_arms:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm in grid_arms:
        lrs, means, lows, highs = [], [], [], []
        for lr in sorted(arm.selection):
            values = [x for x in (score(r, metric.name, protocol.select_last) for r in arm.selection[lr])
                      if x is not None]
            if values:
                lrs.append(lr)
                means.append(statistics.fmean(values))
                lows.append(min(values))
                highs.append(max(values))
        (line,) = ax.plot(lrs, means, marker="o", label=arm.label, ls="--" if arm.is_full else "-")
        ax.fill_between(lrs, lows, highs, color=line.get_color(), alpha=0.18, lw=0)
        if arm.best_lr in lrs:
            ax.plot([arm.best_lr], [means[lrs.index(arm.best_lr)]], marker="*", ms=16, color=line.get_color(),
                    markeredgecolor="k")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(metric.label)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"{metric.label} against LR (selection seeds; band = min..max; star = best LR)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _num(value: float, metric: Any, sign: str = "") -> str:
    """A gap in the metric's declared unit: points to 0.1 for a rate, 3 significant digits otherwise."""
    return f"{100 * value:{sign}.1f}" if metric.is_rate else f"{value:{sign}.3g}"


def _lr(lr: float | None) -> str:
    return "n/a" if lr is None or (isinstance(lr, float) and math.isnan(lr)) else f"{lr:g}"
