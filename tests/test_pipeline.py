"""Pipelines (rl_lora/study/pipeline.py): a reward model, then GRPO against it, as one `rl-lora run`.

The end-to-end test runs the three-stage shape on the tiny random-init model: a reward model trained
on preference pairs, then GRPO whose only reward is that model (``learned:${reward_model.saved}``).
A failing stage stops the pipeline and keeps the finished one; ``--resume`` reruns only what is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rl_lora.study.pipeline import load_pipeline
from rl_lora.utils.errors import ConfigError
from tests_support import tiny_raw

REPO = Path(__file__).resolve().parent.parent


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _stage_recipes(tmp: Path) -> None:
    """rm.yaml (a tiny reward model) and grpo.yaml (the tiny GRPO recipe) in ``tmp``."""
    rm = tiny_raw(tmp / "unused", data={"max_operand": 30, "eval_size": 20}, train={"batch_size": 8, "threads": 1})
    rm = {k: v for k, v in rm.items() if k not in ("grpo", "reward")} | {"algorithm": "reward"}
    _write(tmp / "rm.yaml", rm)
    _write(tmp / "grpo.yaml", tiny_raw(tmp / "unused", train={"steps": 3, "batch_size": 16, "threads": 1}))


def _pipeline(tmp: Path, reward: str, name: str = "pipe.yaml") -> Path:
    return _write(tmp / name, {
        "name": "rlhf_tiny",
        "output_dir": str(tmp / "runs"),
        "stages": [
            {"name": "reward_model", "recipe": "rm.yaml"},
            {"name": "policy", "recipe": "grpo.yaml",
             "overrides": {"reward.functions": [{"name": reward}], "grpo.beta": 0.5}},
        ],
    })


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rl_lora.cli", "run", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_reward_model_then_grpo_on_it(tmp_path: Path) -> None:
    _stage_recipes(tmp_path)
    # Stage 2 points at a folder the reward model does not have: it fails, stage 1 is kept.
    broken = _cli(str(_pipeline(tmp_path, "learned:${reward_model.saved}/missing")))
    assert broken.returncode == 2
    assert "pipeline stage 'policy' failed" in broken.stderr.splitlines()[-1]
    [folder] = (tmp_path / "runs").iterdir()
    finished = folder / "reward_model" / "summary.json"
    stamp = finished.stat().st_mtime_ns
    assert not (folder / "policy" / "summary.json").exists()

    # Fixed, and resumed: only the policy stage runs, against the reward model stage 1 saved.
    done = _cli(str(_pipeline(tmp_path, "learned:${reward_model.saved}")), "--resume", str(folder))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'reward_model': already finished" in done.stderr
    assert finished.stat().st_mtime_ns == stamp
    policy = json.loads((folder / "policy" / "summary.json").read_text())
    saved_rm = json.loads(finished.read_text())["saved"]
    config = yaml.safe_load((folder / "policy" / "config.yaml").read_text())
    assert config["reward"]["functions"][0]["name"] == f"learned:{saved_rm}"
    assert config["grpo"]["beta"] == 0.5
    assert "final_accuracy" in policy and "final_reward" in policy  # exact-answer accuracy and the learned score
    manifest = json.loads((folder / "pipeline.json").read_text())
    assert [s["stage"] for s in manifest["stages"]] == ["reward_model", "policy"]
    assert manifest["stages"][0]["algorithm"] == "reward" and "final_pairwise_accuracy" in manifest["stages"][0]
    assert "policy (grpo, lora-r1): accuracy" in done.stdout
    plot = folder / "policy_proxy_vs_held_out.png"  # the learned reward and held-out accuracy on one figure
    assert manifest["stages"][1]["proxy_plot"] == str(plot) and plot.stat().st_size > 10_000
    assert f"proxy vs held-out: {plot}" in done.stdout


@pytest.mark.parametrize(("stages", "message"), [
    ([{"name": "a", "recipe": "nope.yaml"}], "stage 'a': recipe 'nope.yaml' does not exist"),
    ([{"name": "a", "recipe": "grpo.yaml", "overides": {}}], "stage 1: unknown key 'overides'"),
    ([{"name": "a", "recipe": "grpo.yaml"}, {"name": "a", "recipe": "grpo.yaml"}], "stage name 'a' is used twice"),
    ([{"name": "a", "recipe": "grpo.yaml", "overrides": {"train.lr": "${b.saved}"}},
      {"name": "b", "recipe": "rm.yaml"}], "'b' is not an earlier stage"),
    ([{"name": "a", "recipe": "rm.yaml"}, {"name": "b", "recipe": "grpo.yaml", "overrides": {"x": "${a.adapter}"}}],
     "a stage's outputs are ${a.saved}, ${a.run_dir}"),
    ([{"name": "a", "recipe": "grpo.yaml", "overrides": {"lora.rnak": 4}}], "stage 'a' (recipe 'grpo.yaml')"),
])
def test_bad_pipelines_name_the_stage(tmp_path: Path, stages: list, message: str) -> None:
    _stage_recipes(tmp_path)
    path = _write(tmp_path / "bad.yaml", {"name": "bad", "stages": stages})
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "runs").exists()


def test_shipped_pipeline_validates() -> None:
    pipeline = load_pipeline(REPO / "recipes" / "pipelines" / "rlhf_arithmetic.yaml")
    assert [s.name for s in pipeline.stages] == ["reward_model", "policy"]
    assert pipeline.stages[1].overrides["reward.functions"] == [{"name": "learned:${reward_model.saved}"}]


def test_command_line_overrides_reach_every_stage_and_bind_a_resume(tmp_path: Path) -> None:
    _stage_recipes(tmp_path)
    raw = yaml.safe_load(_pipeline(tmp_path, "learned:${reward_model.saved}").read_text())
    raw["stages"][0]["require"] = {"final_pairwise_accuracy": 1.01}  # stop after the cheap first stage
    path = _write(tmp_path / "strict.yaml", raw)
    bad = _cli(str(path), "train.sead=3")
    assert bad.returncode == 2 and "stage 'reward_model'" in bad.stderr and "sead" in bad.stderr
    assert not (tmp_path / "runs").exists()  # refused before any stage ran
    result = _cli(str(path), "train.seed=3")
    assert result.returncode == 2
    folder = next((tmp_path / "runs").glob("rlhf_tiny-*"))
    assert yaml.safe_load((folder / "reward_model" / "config.yaml").read_text())["train"]["seed"] == 3
    assert json.loads((folder / "pipeline.json").read_text())["overrides"] == ["train.seed=3"]
    other = _cli(str(path), "train.seed=4", "--resume", str(folder))
    assert other.returncode == 2 and "started with the overrides ['train.seed=3']" in other.stderr


def test_a_reward_model_short_of_its_requirement_stops_the_pipeline_before_the_policy(tmp_path: Path) -> None:
    _stage_recipes(tmp_path)
    raw = yaml.safe_load(_pipeline(tmp_path, "learned:${reward_model.saved}").read_text())
    raw["stages"][0]["require"] = {"final_pairwise_accuracy": 1.01}  # no reward model reaches it
    result = _cli(str(_write(tmp_path / "strict.yaml", raw)))
    assert result.returncode == 2
    assert "pipeline stage 'reward_model' ended short of what later stages need: final_pairwise_accuracy" in \
        result.stderr and "< 1.01" in result.stderr
    folder = next((tmp_path / "runs").glob("rlhf_tiny-*"))
    assert (folder / "reward_model" / "summary.json").is_file() and not (folder / "policy").exists()
    summary = json.loads((folder / "reward_model" / "summary.json").read_text())
    assert 0.0 <= summary["final_calibration_error"] <= 1.0 and "final_mean_margin" in summary


def test_pipeline_requirements_are_checked_when_the_file_is_read(tmp_path: Path) -> None:
    _stage_recipes(tmp_path)
    raw = yaml.safe_load(_pipeline(tmp_path, "learned:${reward_model.saved}").read_text())
    raw["stages"][0]["require"] = {"final_pairwise_accuracy": "high"}
    with pytest.raises(ConfigError, match="'require' must map summary.json keys to the least value"):
        load_pipeline(_write(tmp_path / "bad.yaml", raw))
    raw["stages"][0]["require"] = {"final_pairwise_accuracy": 0.8}
    raw["stages"][0]["on_shortfall"] = "ignore"
    with pytest.raises(ConfigError, match="'on_shortfall' must be 'refuse' or 'warn'"):
        load_pipeline(_write(tmp_path / "bad.yaml", raw))


def test_calibration_error_of_bradley_terry_probabilities() -> None:
    from rl_lora.algorithms.reward_model import calibration_error

    assert calibration_error([20.0] * 10) == pytest.approx(0.0, abs=1e-6)  # sure and right
    assert calibration_error([-20.0] * 10) == pytest.approx(1.0, abs=1e-6)  # sure and always wrong
    assert calibration_error([0.0] * 4) == pytest.approx(0.5)  # 50% sure, right never (ties are wrong)
