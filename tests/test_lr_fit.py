"""The fitted optimum LR and its bootstrap interval (rl_lora/study/lr_fit.py), on scores whose top is known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rl_lora.study.lr_fit import collapsed_lrs, fit_optimum, optimum_interval, ratio_interval
from rl_lora.study.report import write_report

GRID = [1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3]


def parabola(top: float, noise: tuple[float, ...] = (0.0, 0.0), height: float = 0.9) -> dict[float, list[float]]:
    """Scores 0.9 - 0.05 * ln(lr / top)^2 at each grid LR, one per entry of ``noise`` (added to it)."""
    return {lr: [height - 0.05 * math.log(lr / top) ** 2 + e for e in noise] for lr in GRID}


def test_the_fit_finds_a_top_between_grid_points() -> None:
    fit = fit_optimum(parabola(3e-4), start=0.5)
    assert fit.lr == pytest.approx(3e-4, rel=1e-6)  # not the grid's 2e-4 or 4e-4
    assert fit.fitted == tuple(GRID) and fit.collapsed == ()


def test_a_lower_is_better_metric_takes_the_bottom() -> None:
    scores = {lr: [-v for v in values] for lr, values in parabola(6e-4).items()}
    assert fit_optimum(scores, start=-0.5, higher_is_better=False).lr == pytest.approx(6e-4, rel=1e-6)


def test_a_collapsed_point_is_left_out_of_the_fit() -> None:
    scores = parabola(3e-4)
    scores[1.6e-3] = [0.05, 0.1]  # below the start: gave back all of its gain
    assert collapsed_lrs(scores, start=0.5) == {1.6e-3}
    fit = fit_optimum(scores, start=0.5)
    assert fit.collapsed == (1.6e-3,) and fit.lr == pytest.approx(3e-4, rel=1e-6)
    # without a start nothing counts as collapsed, and the cliff drags the top down
    assert fit_optimum(scores).lr < 0.9 * 3e-4


def test_no_optimum_when_the_parabola_has_no_top_inside_the_grid() -> None:
    valley = {lr: [0.5 + 0.05 * math.log(lr / 4e-4) ** 2] * 2 for lr in GRID}  # best at both edges
    assert fit_optimum(valley).lr is None and "no top" in fit_optimum(valley).why
    beyond = parabola(5e-3)  # the top lies past the grid's largest LR
    assert fit_optimum(beyond, start=0.0).lr is None and "outside" in fit_optimum(beyond, start=0.0).why
    two = {1e-4: [0.8], 2e-4: [0.9], 4e-4: [0.1]}
    fit = fit_optimum(two, start=0.5)
    assert fit.lr is None and "needs 3" in fit.why and fit.collapsed == (4e-4,)


def test_the_bootstrap_interval_holds_the_top_and_narrows_with_less_noise() -> None:
    noisy = parabola(3e-4, noise=(-0.02, 0.0, 0.02, 0.01))
    fit = fit_optimum(noisy, start=0.5)
    interval = optimum_interval(noisy, fit)
    assert interval.defined == 1.0 and interval.low < 3e-4 < interval.high
    quiet = parabola(3e-4, noise=(-0.002, 0.0, 0.002, 0.001))
    narrow = optimum_interval(quiet, fit_optimum(quiet, start=0.5))
    assert narrow.high / narrow.low < interval.high / interval.low
    exact = parabola(3e-4)
    point = optimum_interval(exact, fit_optimum(exact, start=0.5))
    assert point.low == pytest.approx(3e-4, rel=1e-6) and point.high == pytest.approx(3e-4, rel=1e-6)


def test_the_ratio_interval_holds_the_ratio_of_the_tops() -> None:
    lora, full = parabola(1e-3, noise=(-0.01, 0.01, 0.0)), parabola(2e-4, noise=(0.01, -0.01, 0.0))
    lora_fit, full_fit = fit_optimum(lora, start=0.5), fit_optimum(full, start=0.5)
    interval = ratio_interval(lora, lora_fit, full, full_fit)
    assert interval.low < lora_fit.lr / full_fit.lr < interval.high
    assert interval.low < 5 < interval.high


def test_too_few_resamples_with_a_top_give_no_interval() -> None:
    flat = {lr: [0.9, 0.8] for lr in GRID[:3]}  # no curvature to speak of: most resamples have no top inside
    fit = fit_optimum({1e-4: [0.85, 0.8], 2e-4: [0.9, 0.88], 4e-4: [0.86, 0.8]}, start=0.5)
    assert fit.lr is not None
    interval = optimum_interval(flat, fit)
    assert interval.low is None and interval.high is None and interval.defined < 0.9


def test_the_report_gives_the_fitted_optimum_and_ratio_next_to_the_grids(tmp_path: Path) -> None:
    """A sweep folder whose selection scores follow known parabolas (rank 1's top at 1e-3, full's at 2e-4):
    the report's fitted optima and ratio land on them, beside the grid's best LRs (8e-4 and 2e-4)."""
    runs = tmp_path / "runs"
    tops = {"lora-r1": (1, 1e-3, [2e-4, 4e-4, 8e-4, 1.6e-3, 3.2e-3]), "full": ("full", 2e-4, GRID[:4])}
    for method, (rank, top, grid) in tops.items():
        for lr in grid:
            for seed, noise in ((1, -0.005), (2, 0.005)):
                value = 0.9 - 0.05 * math.log(lr / top) ** 2 + noise
                name = f"{'full' if rank == 'full' else 'r1-all'}-b64-lr{lr:g}-s{seed}"
                folder = runs / name
                folder.mkdir(parents=True)
                records = [{"step": 0, "eval/accuracy": 0.5}, {"step": 10, "eval/accuracy": value},
                           {"step": 20, "eval/accuracy": value}]
                (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
                (folder / "summary.json").write_text(json.dumps({
                    "recipe": "fake", "algorithm": "grpo", "method": method, "rank": rank, "seed": seed, "lr": lr,
                    "steps": 300, "lora_targets": "all", "batch_size": 64, "headline_metric": "accuracy",
                    "higher_is_better": True, "final_accuracy": value, "start_accuracy": 0.5,
                    "trainable_params": 10 if rank != "full" else 99, "wall_seconds": 60}))
    (tmp_path / "sweep.json").write_text(json.dumps(
        {"seeds": [3], "selection_seeds": [1, 2], "selection_rule": {"last": 2}, "margin": 0.05}))
    text = write_report(tmp_path).read_text()
    rank1 = next(line for line in text.splitlines() if line.startswith("| lora-r1 | 0.0008 | 0.001 |"))
    assert rank1.endswith("| 5 | none |")
    assert "| full | 0.0002 | 0.0002 |" in text
    ratio = next(line for line in text.splitlines() if line.startswith("| lora-r1 | 0.0008 | 0.0002 | 4x |"))
    assert "| 5x (" in ratio  # the fitted ratio: 1e-3 / 2e-4
