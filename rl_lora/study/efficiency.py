"""A sweep's parameter-efficiency view: each method's score at its best LR against its trainable parameters.

The report's verdict table says whether each method is within the margin of full fine-tuning; this view says
what each one buys per trainable parameter: the score (mean over confirmation seeds, with the interval of the
mean at the report's level) on a log axis of trainable parameters, full fine-tuning as the reference line,
and each method's peak memory and step time beside it. Methods with one count of trainable parameters each
(ranks, adapter types) line up left to right from the smallest adapter to full.

Nothing here imports torch (rl_lora/study/ is the light layer).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rl_lora.study.comparison import LEVEL, t_quantile  # noqa: E402


@dataclass(frozen=True)
class EfficiencyPoint:
    """One method at the LR its verdict reads: its trainable parameters, per-seed scores and costs."""

    label: str
    params: int
    scores: list[float]
    is_full: bool
    memory: float | None = None  # peak bytes (process RSS on CPU, CUDA's peak allocation on a GPU)
    step_time: float | None = None  # seconds

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)

    @property
    def half_width(self) -> float | None:
        """Half the two-sided interval of the mean at the report's level (Student t); None for one seed."""
        if len(self.scores) < 2:
            return None
        return t_quantile(1 - (1 - LEVEL) / 2, len(self.scores) - 1) * statistics.stdev(self.scores) / math.sqrt(
            len(self.scores))


def shown(points: list[EfficiencyPoint]) -> bool:
    """Whether the view says anything: a full-parameter reference and methods of at least two sizes beside it."""
    sizes = {p.params for p in points if not p.is_full and p.scores}
    return any(p.is_full and p.scores for p in points) and len(sizes) >= 2


def efficiency_lines(points: list[EfficiencyPoint], metric_label: str) -> list[str]:
    """The view's table, smallest adapter first: trainable parameters, their share of full's, the score with
    the interval of its mean, and peak memory and step time relative to full."""
    full = next(p for p in points if p.is_full and p.scores)
    level = f"{int(LEVEL * 100)}%"
    lines = [f"| method | trainable params | share of full's | {metric_label} (mean, {level} interval of the mean)"
             " | seeds | peak memory vs full | step time vs full |", "|---|---|---|---|---|---|---|"]
    for p in sorted((p for p in points if p.scores), key=lambda p: (p.is_full, p.params)):
        half = p.half_width
        interval = f" [{p.mean - half:.3f}, {p.mean + half:.3f}]" if half is not None else ""
        lines.append(
            f"| {p.label} | {p.params:,} | {p.params / full.params:.3%} | {p.mean:.3f}{interval} | "
            f"{len(p.scores)} | {_ratio(p.memory, full.memory)} | {_ratio(p.step_time, full.step_time)} |")
    return lines


def efficiency_plot(points: list[EfficiencyPoint], metric_label: str, path: Path) -> None:
    """Score against trainable parameters (log axis): each method a point with its interval, full a line."""
    full = next(p for p in points if p.is_full and p.scores)
    others = sorted((p for p in points if not p.is_full and p.scores), key=lambda p: p.params)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    band = full.half_width or 0.0
    ax.axhline(full.mean, color="#555", ls="--", lw=1.2, label=f"full ({full.params:,} params)")
    if band:
        ax.axhspan(full.mean - band, full.mean + band, color="#999", alpha=0.2, lw=0)
    for p in others:
        ax.errorbar([p.params], [p.mean], yerr=[[p.half_width or 0.0], [p.half_width or 0.0]], fmt="o",
                    capsize=4, label=f"{p.label} ({p.params:,})")
        ax.annotate(p.label, (p.params, p.mean), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(metric_label)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{metric_label} at each method's LR against its trainable parameters\n"
                 f"(bars and band: {int(LEVEL * 100)}% interval of the mean over confirmation seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else "n/a"
