"""The comparison part of the sweep report: each arm's best LR, the best-vs-best verdict, the LR ratio.

It reads the sweep's protocol from ``sweep.json`` (which seeds selected LRs, which confirm, the selection
score and the margin), scores every run the same way (rl_lora/study/comparison.py), and returns Markdown lines
and one plot: the headline metric against LR, one curve per arm with its seed band, best LR marked.
Sweeps without an LR grid (and sweeps from before the protocol existed) get the same verdict table, with
a line saying that each method ran at one untuned LR.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from rl_lora.estimate.lr_rule import default_multiplier
from rl_lora.study.comparison import LEVEL, choose_lr, selection_score, verdict, welch_gap
from rl_lora.study.sweep_plan import log_step

DEFAULT_RATE_MARGIN = 0.05  # 5 points, for metrics that are rates in [0, 1]
DEFAULT_RELATIVE_MARGIN = 0.05  # 5% of full's mean, for any other metric


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
    path = sweep_dir / "sweep.json"
    if not path.is_file():
        return Protocol()
    manifest = json.loads(path.read_text())
    rule = manifest.get("selection_rule") or {}
    seeds = manifest.get("seeds")
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


def _is_rate(values: list[float]) -> bool:
    return bool(values) and all(0.0 <= v <= 1.0 for v in values)


def verdict_lines(arms: list[ArmRuns], protocol: Protocol, metric: Any) -> list[str]:
    """The best-vs-best table and the sentence that states its rules."""
    scores = {a.key: [x for x in (score(r, metric.name, protocol.select_last) for r in a.confirmed()[1])
                      if x is not None] for a in arms}
    fulls = {a.key[2]: a for a in arms if a.is_full}
    rate = _is_rate([v for values in scores.values() for v in values])
    scale, unit = (100, " points") if rate else (1, "")
    margin = protocol.margin
    if margin is None:
        full_means = [statistics.fmean(scores[a.key]) for a in fulls.values() if scores[a.key]]
        margin = DEFAULT_RATE_MARGIN if rate else DEFAULT_RELATIVE_MARGIN * abs(
            statistics.fmean(full_means)) if full_means else DEFAULT_RATE_MARGIN
        margin_source = "5 points, the default for rates" if rate else "5% of full's mean, the default"
    else:
        margin_source = "set by --margin"
    margin_text = f"{margin * scale:g}{unit}"
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
    lines += [
        f"Score: {metric.label}, {what}. Gap: method - full (at the same batch size), with its Welch t "
        f"{int(LEVEL * 100)}% interval; margin ±{margin_text} ({margin_source}).", "",
        f"| method | LR | seeds | score (mean ± sd) | gap to full | {int(LEVEL * 100)}% interval | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        values = scores[arm.key]
        lr, _ = arm.confirmed()
        if not values:
            lines.append(f"| {arm.label} | {_lr(lr)} | 0 | n/a | n/a | n/a | no confirmation run finished |")
            continue
        sd = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        head = f"| {arm.label} | {_lr(lr)} | {len(values)} | {statistics.fmean(values):.3f}{sd} |"
        full = fulls.get(arm.key[2])
        if arm.is_full:
            lines.append(f"{head} — | — | baseline |")
        elif full is None or not scores[full.key]:
            lines.append(f"{head} n/a | n/a | no full-parameter run at this batch size |")
        else:
            gap = welch_gap(values, scores[full.key])
            interval = "n/a" if gap.low is None else f"[{gap.low * scale:+.1f}, {gap.high * scale:+.1f}]"
            said = verdict(gap, margin, metric.higher_is_better, margin_text)
            lines.append(f"{head} {gap.gap * scale:+.1f}{unit} | {interval} | {said} |")
    return lines


def lr_lines(arms: list[ArmRuns], protocol: Protocol, metric: Any) -> list[str]:
    """The selection table (score per LR, best marked) and the measured LoRA/full best-LR ratio."""
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
    fulls = {a.key[2]: a for a in grid_arms if a.is_full and a.best_lr}
    ratio_rows = []
    for arm in grid_arms:
        full = fulls.get(arm.key[2])
        if arm.is_full or full is None or arm.best_lr is None:
            continue
        step = log_step(sorted(arm.selection))
        ratio_rows.append(f"| {arm.label} | {arm.best_lr:g} | {full.best_lr:g} | {arm.best_lr / full.best_lr:.3g}x | "
                          f"{default_multiplier(arm.steps):g}x | {f'{step:.2g}x' if step else 'n/a'} |")
    if ratio_rows:
        lines += ["LoRA's best LR over full's (claim 5 of docs/findings.md), next to the LR rule's multiplier; "
                  "the measured ratio is only as fine as the grid's step:", "",
                  "| method | best LR | full's best LR | measured ratio | rule | grid step |",
                  "|---|---|---|---|---|---|",
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


def _lr(lr: float | None) -> str:
    return "n/a" if lr is None or (isinstance(lr, float) and math.isnan(lr)) else f"{lr:g}"
