"""A metric's unit is declared, never guessed from its values (issue #28 item 4), and the sweep report states
its own strength: each arm's equivalence bound, a floor for seeds without spread, the interval's test (#31).

Before units were declared, four places decided "values in [0, 1], so a rate": a calibration error got a
5-point margin and a metric centred on 0 a margin of about 0 (5% of a mean near 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import TrainerControl

from rl_lora.config.schema import GuardSpec
from rl_lora.launch.runner import fell_back
from rl_lora.study.comparison import equivalence_bound, welch_gap
from rl_lora.study.report import write_report
from rl_lora.tasks.base import RATE, Metric
from rl_lora.training.guard import OverOptimizationGuard, drop_margin

CALIBRATION = Metric("calibration_error", higher_is_better=False, unit="ECE")
CENTRED = Metric("score", unit="reward")  # a reward centred on 0: starts near -1, ends near +0.1


def test_built_in_metrics_declare_their_units() -> None:
    from rl_lora.algorithms.reward_model import CALIBRATION_ERROR, MEAN_MARGIN, PAIRWISE_ACCURACY
    from rl_lora.tasks.arithmetic.task import ACCURACY

    assert ACCURACY.is_rate and PAIRWISE_ACCURACY.is_rate
    assert not CALIBRATION_ERROR.is_rate and not MEAN_MARGIN.is_rate
    assert Metric("anything").unit is None and not Metric("anything").is_rate  # undeclared: never a rate


def test_a_metric_with_units_gets_a_margin_in_its_units() -> None:
    # a reward that training moved from -1.0 to 0.1: 5% of that movement, not 5% of |0.1| and not 5 "points"
    assert CENTRED.margin_in_units(0.05, best=0.1, start=-1.0) == pytest.approx(0.055)
    assert Metric("accuracy", unit=RATE).margin_in_units(0.05, best=0.1, start=-1.0) == 0.05
    # the guard reads the declared unit: a dip of 0.05 from a best of 0.1 is inside 0.055
    assert drop_margin(GuardSpec(margin=0.05), CENTRED, 0.1, -1.0) == pytest.approx(0.055)
    records: list[dict] = []
    guard = OverOptimizationGuard(GuardSpec(patience=1), CENTRED, "reward", records)
    rows = [{"step": 0, "reward": 0.0, "eval/score": -1.0}, {"step": 10, "reward": 0.1, "eval/score": 0.1},
            {"step": 20, "reward": 0.9, "eval/score": 0.05}]
    for row in rows:
        records.append(row)
        guard.on_log(None, None, TrainerControl())
    assert guard.events == []  # relative to |best| (0.005) this dip would have been over-optimization


def test_a_calibration_error_is_not_treated_as_a_rate() -> None:
    # calibration error 0.30 at the start, best 0.02, final 0.035: 75% worse than its best. As a "rate" the
    # 1.5-point rise sits inside a 5-point margin; in its units (5% of the 0.28 it moved) it does not.
    summary = {"start_calibration_error": 0.30, "best_calibration_error": 0.02, "final_calibration_error": 0.035}
    assert fell_back(summary, CALIBRATION)
    assert not fell_back(summary, Metric("calibration_error", False, unit=RATE))
    assert CALIBRATION.format_change(0.015) == "+0.015 ECE"
    assert Metric("accuracy", unit=RATE).format_change(0.015) == "+1.5 points"


def test_run_folders_without_a_declared_unit_read_the_built_in_rates_as_rates() -> None:
    assert Metric.from_summary({"headline_metric": "accuracy"}).is_rate  # published runs predate units
    assert not Metric.from_summary({"headline_metric": "held_out_reward"}).is_rate
    declared = Metric.from_summary({"headline_metric": "score", "headline_unit": "reward",
                                    "headline_resolution": None})
    assert declared.unit == "reward"


def test_the_equivalence_bound_and_the_floor_for_seeds_without_spread() -> None:
    gap = welch_gap([0.93, 0.94, 0.92, 0.93], [0.97, 0.98, 0.96, 0.97])
    assert equivalence_bound(gap) == pytest.approx(max(abs(gap.low), abs(gap.high)))
    flat = welch_gap([0.9, 0.9, 0.9], [0.95, 0.95, 0.95])
    assert flat.low == flat.high == pytest.approx(-0.05)  # no floor: a point
    floored = welch_gap([0.9, 0.9, 0.9], [0.95, 0.95, 0.95], floor_sd=1 / 300)
    assert floored.low < -0.05 < floored.high and floored.half_width > 0.003


def _run(runs: Path, name: str, method: str, rank: int | str, seed: int, curve: list[float],
         unit: str | None, resolution: float | None = None, metric: str = "score") -> None:
    folder = runs / name
    folder.mkdir(parents=True)
    records = [{"step": 10 * i, f"eval/{metric}": v, "reward": v} for i, v in enumerate(curve)]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    summary = {"recipe": "fake", "algorithm": "grpo", "method": method, "rank": rank, "seed": seed, "lr": 1e-3,
               "steps": 30, "lora_targets": "all", "batch_size": 64, "headline_metric": metric,
               "headline_unit": unit, "headline_resolution": resolution, "higher_is_better": True,
               f"start_{metric}": curve[0], f"final_{metric}": curve[-1], "trainable_params": 1, "wall_seconds": 1}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_a_report_on_a_metric_centred_on_0_states_its_margin_in_its_units(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed, (lora, full) in {1: (0.98, 1.00), 2: (1.00, 1.02), 3: (0.99, 1.01)}.items():
        _run(runs, f"r1-s{seed}", "lora-r1", 1, seed, [-1.0, lora], "reward")
        _run(runs, f"full-s{seed}", "full", "full", seed, [-1.0, full], "reward")
    text = write_report(tmp_path).read_text()
    # full moved from -1.0 to 1.01: 5% of 2.01 = 0.1005 reward, not 5% of a mean near 0 and not 5 points
    assert "Margin ±0.1 reward (5% of how far training moved full's score" in text  # 0.1005
    row = next(line for line in text.splitlines() if line.startswith("| lora-r1 |"))
    assert "| -0.02 reward |" in row
    assert "within ±0.1 reward of full" in row and "| ±0.0374 reward |" in row
    assert "two one-sided Welch t tests (TOST) at 5% each side" in text
    assert "90% two-sided Welch t intervals" in text


def test_a_rate_report_floors_seeds_without_spread_and_states_each_bound(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed in (1, 2, 3):
        _run(runs, f"r1-s{seed}", "lora-r1", 1, seed, [0.1, 0.95], RATE, 1 / 300, "accuracy")
        _run(runs, f"full-s{seed}", "full", "full", seed, [0.1, 0.97], RATE, 1 / 300, "accuracy")
    text = write_report(tmp_path).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| lora-r1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    low, high = (float(x) for x in cells[5].strip("[]").split(","))
    assert low < -2.0 < high  # floored at one held-out problem (0.33 points): not the point [-2.0, -2.0]
    assert cells[6] == f"±{max(abs(low), abs(high)):.1f} points"
    assert "floored at the metric's resolution (0.33 points" in text
    assert "full's error rate is 3.0 points, so a margin of 5 points admits up to 2.7x" in text
