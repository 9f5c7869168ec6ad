"""Reward over-optimization: the guard's rule on logged records, and a run against a deliberately bad reward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import TrainerControl

from rl_lora.config.schema import GuardSpec, validate
from rl_lora.launch.runner import run_recipe
from rl_lora.tasks.base import RATE, Metric
from rl_lora.training.guard import OverOptimizationGuard
from tests_support import tiny_raw

ACCURACY = Metric("accuracy", unit=RATE)


def _feed(guard: OverOptimizationGuard, records: list[dict], rows: list[dict]) -> TrainerControl:
    control = TrainerControl()
    for row in rows:
        records.append(row)
        guard.on_log(None, None, control)
    return control


def test_the_proxy_rising_while_the_metric_falls_is_reported_once_at_its_step() -> None:
    records: list[dict] = []
    guard = OverOptimizationGuard(GuardSpec(margin=0.05), ACCURACY, "reward", records)
    rows = [{"step": 0, "eval/accuracy": 0.40}]
    rows += [{"step": s, "reward": 0.2} for s in range(1, 10)] + [{"step": 10, "reward": 0.2, "eval/accuracy": 0.50}]
    rows += [{"step": s, "reward": 0.6, "kl": 2.0} for s in range(11, 20)]
    rows += [{"step": 20, "reward": 0.7, "eval/accuracy": 0.46}]  # 4 points down: within the margin
    rows += [{"step": 30, "reward": 0.8, "eval/accuracy": 0.30}, {"step": 40, "reward": 0.9, "eval/accuracy": 0.1}]
    control = _feed(guard, records, rows)
    assert not control.should_training_stop  # action: warn
    [event] = guard.events  # two evaluations in a row (guard.patience): seen at 30, reported at 40
    assert event["kind"] == "proxy_up_metric_down" and (event["first_seen"], event["step"]) == (30, 40)
    assert (event["best"], event["best_step"], event["value"]) == (0.50, 10, 0.10)
    assert event["proxy_then"] == pytest.approx(0.2) and event["proxy_now"] > 0.6 and event["kl"] == 2.0


def test_a_metric_falling_with_its_proxy_is_not_over_optimization_and_lower_is_better_counts_up() -> None:
    records: list[dict] = []
    guard = OverOptimizationGuard(GuardSpec(), ACCURACY, "reward", records)
    _feed(guard, records, [{"step": 0, "reward": 0.5, "eval/accuracy": 0.5},
                           {"step": 10, "reward": 0.1, "eval/accuracy": 0.2}])
    assert guard.events == []  # the training reward fell too: a bad run, not a hacked reward
    loss = Metric("loss", higher_is_better=False)
    records = []
    guard = OverOptimizationGuard(GuardSpec(action="stop", patience=1), loss, "reward", records)
    control = _feed(guard, records, [{"step": 0, "reward": 0.1, "eval/loss": 2.0},
                                     {"step": 10, "reward": 0.9, "eval/loss": 3.0}])
    assert guard.events[0]["step"] == 10 and control.should_training_stop  # 50% worse than the best 2.0


def test_one_noisy_dip_is_not_reported() -> None:
    records: list[dict] = []
    guard = OverOptimizationGuard(GuardSpec(), ACCURACY, "reward", records)
    _feed(guard, records, [{"step": 0, "reward": 0.0, "eval/accuracy": 0.083},
                           {"step": 25, "reward": 0.07, "eval/accuracy": 0.017},  # a dip of 4 in 60 problems
                           {"step": 50, "reward": 0.2, "eval/accuracy": 0.083}])
    assert guard.events == []


def test_kl_above_its_budget_for_the_patience_is_an_event() -> None:
    records: list[dict] = []
    guard = OverOptimizationGuard(GuardSpec(kl_tolerance=0.5, kl_patience=3), ACCURACY, "reward", records,
                                  kl_budget=1.0)
    _feed(guard, records, [{"step": 1, "kl": 1.4}, {"step": 2, "kl": 1.6}, {"step": 3, "kl": 1.7}])
    assert guard.events == []  # two steps past 1.5: not yet
    _feed(guard, records, [{"step": 4, "kl": 2.0}])
    assert guard.events[0]["kind"] == "kl_over_budget" and guard.events[0]["step"] == 4


@pytest.mark.slow
def test_a_bad_reward_is_caught_stopped_and_the_best_policy_kept(tmp_path: Path) -> None:
    """A reward for writing '1's: the proxy rises as the built-in model forgets how to add."""
    raw = tiny_raw(tmp_path / "runs", model={"policy": "builtin:arithmetic-tiny", "warmup_steps": 650},
                   reward={"functions": [{"name": "reward_helpers:digit_ones"}]},
                   data={"eval_size": 300}, grpo={"num_generations": 8, "max_completion_length": 5},
                   train={"steps": 60, "batch_size": 32, "lr": 1e-3, "eval_every": 5, "threads": 1},
                   guard={"action": "stop", "keep_best": True})
    result = run_recipe(validate(raw))
    s = result.summary
    [event] = s["overoptimization"]
    assert event["kind"] == "proxy_up_metric_down" and event["proxy"] == "reward"
    assert event["proxy_now"] > event["proxy_then"] and event["best"] - event["value"] > 0.05
    assert s["trained_steps"] == event["step"] < 60  # stopped at the evaluation that saw it
    assert s["best_saved"]["step"] == s["best_accuracy_step"] == event["best_step"]
    assert (result.run_dir / "best" / "adapter_model.safetensors").is_file()
    assert s["final_accuracy"] == event["value"] < s["best_accuracy"]
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == event["step"]


@pytest.mark.slow
def test_ppo_holds_its_kl_budget(tmp_path: Path) -> None:
    """A reward that pulls the policy away from the base (writing '1's), PPO's adaptive KL controller on a
    budget of 1 nat per completion with a fast horizon (one batch): measured, the mean KL over the last 30 of
    60 steps was 1.17 (steps 1-10: 2.18, peaks of 5); the stated tolerance is +-50%."""
    import statistics

    raw = tiny_raw(tmp_path / "runs", model={"policy": "builtin:arithmetic-tiny", "warmup_steps": 650},
                   reward={"functions": [{"name": "reward_helpers:digit_ones"}]}, data={"eval_size": 300},
                   ppo={"samples_per_prompt": 4, "max_completion_length": 5, "epochs": 2, "minibatch_size": 16,
                        "kl_coef": 0.05, "adaptive_kl": True, "target_kl": 1.0, "kl_horizon": 32},
                   train={"steps": 60, "batch_size": 32, "lr": 1e-4, "eval_every": 30, "threads": 1})
    raw = {k: v for k, v in raw.items() if k != "grpo"} | {"algorithm": "ppo"}
    result = run_recipe(validate(raw))
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    kl = [r["kl"] for r in records if "kl" in r]
    coef = [r["kl_coef"] for r in records if "kl_coef" in r]
    assert len(kl) == 60 and max(coef) > 2 * coef[0]  # the controller pushed back
    assert 0.5 <= statistics.fmean(kl[30:]) <= 1.5, statistics.fmean(kl[30:])
    assert not any(e["kind"] == "kl_over_budget" for e in result.summary["overoptimization"] or [])
