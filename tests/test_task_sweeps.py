"""A user's own data end to end: ``rl-lora run``, ``rl-lora sweep --ranks 1,full`` and ``rl-lora report`` judge
by the task's headline metric, for GRPO on a dataset task, for DPO and for reward-model training.

Each sweep runs its runs as separate ``rl-lora run`` processes (as users do), on the tiny random-init
built-in model, a few steps each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl_lora.cli import main
from tests_support import tiny_raw

ROWS = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(10, 50)]
PAIRS = [{"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 1)} for a in range(10, 40)]
SCORING = '''
def first_digit(prompts, completions, answer, **_):
    return [float(c[:1] == a[:1]) for c, a in zip(completions, answer)]


def exact_match(prompts, completions, answer, **_):
    return [float(c.split("\\n")[0].strip() == a) for c, a in zip(completions, answer)]
'''


def _write(tmp: Path, raw: dict) -> Path:
    recipe = tmp / "recipe.yaml"
    recipe.write_text(json.dumps(raw))  # JSON is YAML
    return recipe


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sweep_report(tmp: Path, recipe: Path, seeds: str) -> tuple[str, list[dict]]:
    code = main(["sweep", str(recipe), "--ranks", "1,full", "--seeds", seeds, "--output-dir", str(tmp / "sweeps"),
                 "--name", "s"])
    assert code == 0
    sweep = tmp / "sweeps" / "s"
    summaries = [json.loads(p.read_text()) for p in (sweep / "runs").glob("*/summary.json")]
    assert main(["report", str(sweep)]) == 0  # the report command on its own, too
    return (sweep / "report.md").read_text(), summaries


def _row(report: str, method: str) -> list[str]:
    """The method's row of the cost table (the report's last table naming it)."""
    line = [x for x in report.splitlines() if x.startswith(f"| {method} |")][-1]
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.mark.slow
def test_a_users_jsonl_and_reward_file_run_sweep_and_report_by_the_users_metric(tmp_path: Path) -> None:
    (tmp_path / "scoring.py").write_text(SCORING)
    raw = tiny_raw(tmp_path / "runs", reward={"functions": [{"name": f"{tmp_path / 'scoring.py'}:first_digit"}]},
                   train={"steps": 2, "eval_every": 1})
    raw["data"] = {"task": "dataset", "source": str(_jsonl(tmp_path / "mine.jsonl", ROWS)), "eval_fraction": 0.25,
                   "metrics": [{"name": f"{tmp_path / 'scoring.py'}:exact_match"}]}
    recipe = _write(tmp_path, raw)
    assert main(["run", str(recipe)]) == 0
    report, summaries = _sweep_report(tmp_path, recipe, "1,2")
    assert {s["headline_metric"] for s in summaries} == {"exact_match"}
    assert all({"final_exact_match", "final_held_out_reward/first_digit"} <= set(s) for s in summaries)
    assert "| final held-out exact match |" in report and "Judged by held-out exact match" in report
    for method in ("lora-r1", "full"):
        cells = _row(report, method)
        assert cells[1] == "2" and cells[3] != "n/a", cells  # two seeds, a final value of the user's metric
    assert (tmp_path / "sweeps" / "s" / "exact_match.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(("algorithm", "metric", "training_curve"), [
    ("dpo", "rewards/accuracies", "rewards/margins"),  # user pairs: judged on its held-out pairs
    ("reward", "pairwise_accuracy", "accuracy"),
])
def test_dpo_and_reward_model_sweeps_make_complete_reports(tmp_path: Path, algorithm: str, metric: str,
                                                           training_curve: str) -> None:
    raw = tiny_raw(tmp_path / "runs", data={"max_operand": 30, "eval_size": 20,
                                            "preferences": str(_jsonl(tmp_path / "prefs.jsonl", PAIRS))},
                   train={"steps": 2, "batch_size": 4, "eval_every": 1})
    raw = {k: v for k, v in raw.items() if k not in ("grpo", "reward")} | {"algorithm": algorithm}
    report, summaries = _sweep_report(tmp_path, _write(tmp_path, raw), "1")
    assert {s["headline_metric"] for s in summaries} == {metric}
    assert f"| final held-out {metric.replace('_', ' ')} |" in report
    for method in ("lora-r1", "full"):
        cells = _row(report, method)
        assert cells[3] != "n/a" and cells[4] != "n/a", cells  # final value, mean over training
    assert f"Training {training_curve}" in report
