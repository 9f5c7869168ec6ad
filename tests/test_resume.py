"""Resume: a run killed after a checkpoint and resumed in a new process logs the same per-step metrics
as the uninterrupted run and ends with a bit-identical adapter (CPU, fp32)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests_support import kill_after_checkpoint, subprocess_env, tiny_raw

REPO = Path(__file__).resolve().parent.parent
COMPARED = ("loss", "reward", "lr", "grad_norm")
# The tests reading the shared GRPO run stay on one pytest-xdist worker (--dist loadgroup): one launch.
SHARED_GRPO_RUN = pytest.mark.xdist_group("resume-grpo-whole")


def _recipe(tmp: Path, train: dict | None = None, algorithm: str = "grpo") -> Path:
    raw = tiny_raw(tmp / "runs", train={"steps": 8, "save_every": 2, "keep_last": 2, "eval_every": 4, **(train or {})})
    if algorithm in ("dpo", "reward"):  # tests/test_preference_training.py's recipes: built-in pairs, 8 a step
        raw = {k: v for k, v in raw.items() if k not in ("grpo", "reward")} | {"algorithm": algorithm}
        raw["data"] = {"max_operand": 30, "eval_size": 20}
        raw["train"] |= {"batch_size": 8, "threads": 1}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rl_lora.cli", *args], cwd=REPO, env=subprocess_env(threads=None),
                          capture_output=True, text=True, timeout=timeout)


def _records(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["step"] > 0 and "loss" in r}


@pytest.fixture(scope="module")
def grpo_whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder (recipe.yaml, runs/whole) of one uninterrupted 8-step GRPO run sealing a checkpoint every 2
    steps, read by every test below that compares or resumes against it (each launch costs ~8 CPU-s)."""
    tmp = tmp_path_factory.mktemp("grpo-whole")
    whole = _cli("run", str(_recipe(tmp)), "logging.run_name=whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    return tmp


# Logged but not expected to repeat: wall-clock speed and process memory.
NOT_COMPARED = ("step_time", "steps_per_s", "tokens_per_s", "samples_per_s", "generated_tokens_per_s",
                "train_tflops_per_s", "mfu", "peak_rss_bytes", "peak_device_bytes", "peak_device_reserved_bytes")


def _assert_same_run(whole: Path, cut: Path, compared: tuple[str, ...] | None, steps: int) -> None:
    """Same per-step metrics (``compared``, or every logged key but speed and memory) and the same adapter bytes."""
    a, b = _records(whole), _records(cut)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        keys = compared or sorted((set(a[step]) | set(b[step])) - set(NOT_COMPARED))
        for key in keys:
            assert a[step].get(key) == b[step].get(key), (step, key, a[step].get(key), b[step].get(key))
    adapter = "adapter/adapter_model.safetensors"
    assert (whole / adapter).read_bytes() == (cut / adapter).read_bytes()
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["resumed_from_step"] >= steps // 2
    assert len(list((cut / "checkpoints").glob("step_*"))) <= 2  # keep_last


# What each algorithm's records are compared on (None: every logged figure but speed and memory), and
# figures its first record must hold (so that the comparison covers them).
RESUMED = {
    "grpo": (COMPARED, {"loss", "reward", "lr", "grad_norm"}),
    # DPO: TRL's rewards/chosen, rejected, margins, accuracies, logps and logits as well.
    "dpo": (None, {"loss", "lr", "grad_norm", "rewards/margins", "rewards/accuracies"}),
    # Reward model: accuracy and margin; the adapter compared includes the score head.
    "reward": (None, {"loss", "lr", "grad_norm"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", [pytest.param(a, marks=SHARED_GRPO_RUN) if a == "grpo" else a
                                       for a in sorted(RESUMED)])
def test_kill_then_resume_reproduces_the_uninterrupted_run(tmp_path: Path, algorithm: str,
                                                           request: pytest.FixtureRequest) -> None:
    """A run killed after its step-4 checkpoint and resumed in a new process logs what an uninterrupted
    run logs at each of 8 steps, and saves the same adapter bytes."""
    compared, required = RESUMED[algorithm]
    if algorithm == "grpo":
        tmp_path = request.getfixturevalue("grpo_whole")
        recipe = tmp_path / "recipe.yaml"
    else:
        recipe = _recipe(tmp_path, algorithm=algorithm)
        whole = _cli("run", str(recipe), "logging.run_name=whole")
        assert whole.returncode == 0, whole.stderr[-2000:]
    assert required <= set(_records(tmp_path / "runs" / "whole")[1])

    cut = tmp_path / "runs" / "cut"
    kill_after_checkpoint(recipe, cut, 4)
    resumed = _cli("run", str(recipe), "--resume", str(cut))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    _assert_same_run(tmp_path / "runs" / "whole", cut, compared, 8)


@SHARED_GRPO_RUN
def test_resume_refuses_a_changed_rank(grpo_whole: Path) -> None:
    run = grpo_whole / "runs" / "whole"
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    again = _cli("run", str(grpo_whole / "recipe.yaml"), "lora.rank=2", "--resume", str(run))
    assert again.returncode == 2
    assert "lora.rank" in again.stderr and "cannot resume" in again.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing written


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    recipe = _recipe(tmp_path)
    out = _cli("run", str(recipe), "--resume", str(tmp_path / "empty"))
    assert out.returncode == 2 and "no complete checkpoint" in out.stderr


@SHARED_GRPO_RUN
@pytest.mark.slow
def test_a_run_killed_after_its_final_checkpoint_is_finished_by_resume(grpo_whole: Path) -> None:
    """Killed after sealing the step-8 checkpoint of 8 (before its own save): --resume trains nothing, and writes
    the adapter and summary.json the uninterrupted run wrote."""
    tmp_path = grpo_whole
    recipe = tmp_path / "recipe.yaml"
    cut = tmp_path / "runs" / "cut_final"
    kill_after_checkpoint(recipe, cut, 8)
    (cut / "adapter").mkdir()  # what a kill inside the final save leaves: an empty adapter folder
    resumed = _cli("run", str(recipe), "--resume", str(cut))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "is the final step (8): saving the policy and the summary from it, nothing to train" in resumed.stderr
    _assert_same_run(tmp_path / "runs" / "whole", cut, COMPARED, 8)
    a, b = (json.loads((tmp_path / "runs" / r / "summary.json").read_text()) for r in ("whole", "cut_final"))
    for key in ("start_accuracy", "final_accuracy", "best_accuracy", "final_reward", "trained_steps"):
        assert a[key] == b[key], key


@pytest.mark.slow
def test_resume_with_keep_best_keeps_the_best_steps_policy(tmp_path: Path) -> None:
    """guard.keep_best, killed after the step-4 checkpoint and resumed: the resumed guard takes its best
    evaluation from the reloaded records without saving, so best/ holds what the uninterrupted run saved
    there (the best step's policy, not the policy at the resume) and summary.json names the same step."""
    raw = yaml.safe_load(_recipe(tmp_path, train={"eval_every": 2}).read_text())
    raw["guard"] = {"keep_best": True}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    whole = _cli("run", str(recipe), "logging.run_name=whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    cut = tmp_path / "runs" / "cut"
    kill_after_checkpoint(recipe, cut, 4)
    resumed = _cli("run", str(recipe), "--resume", str(cut))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (json.loads((tmp_path / "runs" / r / "summary.json").read_text()) for r in ("whole", "cut"))
    assert a["best_saved"]["step"] == a["best_accuracy_step"] <= 4  # the case: a best before the checkpoint
    assert b["best_saved"]["step"] == b["best_accuracy_step"] == a["best_accuracy_step"]
    best = "best/adapter_model.safetensors"
    digest = [hashlib.sha256((tmp_path / "runs" / r / best).read_bytes()).hexdigest() for r in ("whole", "cut")]
    assert digest[0] == digest[1]
    assert json.loads((cut / "best" / "best_step.json").read_text())["step"] == a["best_accuracy_step"]
