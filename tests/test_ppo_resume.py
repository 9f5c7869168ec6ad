"""PPO checkpoints and exact resume: a run killed (SIGKILL) after a sealed checkpoint and resumed in a
new process logs the same per-step metrics as the uninterrupted run of the same recipe and ends with
bit-identical policy and value adapters (CPU, fp32). Also: no checkpoint is sealed with non-finite
weights, and everything but the weights loads with torch.load(weights_only=True)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rl_lora.algorithms.ppo import checkpoint as ppo_checkpoint
from rl_lora.config.schema import validate
from rl_lora.launch.runner import prepare_run
from rl_lora.utils.errors import CheckpointError
from tests_support import kill_after_checkpoint, subprocess_env, tiny_raw

REPO = Path(__file__).resolve().parent.parent
# Every figure PPO logs that depends on the weights, the data position or the RNG streams.
COMPARED = ("loss", "loss/policy", "loss/value", "reward", "lr", "kl", "kl_coef", "entropy", "num_tokens",
            "clip_frac", "explained_variance", "eval/accuracy")


def _raw(output_dir: Path) -> dict:
    # log_every 2 with save_every 3: the checkpoint at step 3 holds a step not yet logged, which the
    # resumed run must fold into its step-4 record exactly as the uninterrupted run does.
    raw = tiny_raw(output_dir, ppo={"samples_per_prompt": 4, "max_completion_length": 4, "epochs": 2,
                                    "minibatch_size": 8, "adaptive_kl": True},
                   train={"steps": 8, "save_every": 3, "keep_last": 1, "log_every": 2, "eval_every": 4})
    raw["algorithm"] = "ppo"
    del raw["grpo"]  # a PPO recipe has no GRPO section
    return raw



def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rl_lora.cli", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def _records(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["step"] > 0}


@pytest.mark.slow
def test_kill_then_resume_reproduces_the_uninterrupted_ppo_run(tmp_path: Path) -> None:
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(yaml.safe_dump(_raw(tmp_path / "runs")))
    whole = _cli("run", str(recipe), "logging.run_name=whole")
    assert whole.returncode == 0, whole.stderr[-3000:]

    cut = tmp_path / "runs" / "cut"
    kill_after_checkpoint(recipe, cut, 3)

    resumed = _cli("run", str(recipe), "--resume", str(cut))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr

    a, b = _records(tmp_path / "runs" / "whole"), _records(cut)
    assert sorted(a) == sorted(b) == [2, 4, 6, 8]
    for step in a:
        for key in COMPARED:
            assert a[step].get(key) == b[step].get(key), (step, key, a[step].get(key), b[step].get(key))
    for adapter in ("adapter/adapter_model.safetensors", "adapter/value/adapter_model.safetensors"):
        assert (tmp_path / "runs" / "whole" / adapter).read_bytes() == (cut / adapter).read_bytes(), adapter
    assert json.loads((cut / "summary.json").read_text())["resumed_from_step"] in (3, 6)
    assert [p.name for p in (cut / "checkpoints").glob("step_*")] == ["step_000006"]  # keep_last 1


def test_checkpoint_content_loads_without_pickles_and_non_finite_weights_are_refused(tmp_path: Path) -> None:
    raw = _raw(tmp_path / "runs")
    raw["train"].update({"steps": 4, "save_every": 3})
    run = prepare_run(validate(raw))
    run.trainer.train()
    sealed = run.run_dir / "checkpoints" / "step_000003"
    names = {p.name for p in sealed.iterdir()}
    assert {ppo_checkpoint.WEIGHTS, ppo_checkpoint.OPTIMIZER, ppo_checkpoint.SCHEDULER, ppo_checkpoint.STATE} <= names
    state = torch.load(sealed / ppo_checkpoint.STATE, weights_only=True)
    assert state["global_step"] == 3 and 0 < state["num_tokens"] < run.trainer.num_tokens
    assert [r["lr"] for r in state["pending"]] == [run.trainer.lr_scheduler.get_last_lr()[0]]  # step 3, not logged
    for name in (ppo_checkpoint.OPTIMIZER, ppo_checkpoint.SCHEDULER):
        torch.load(sealed / name, weights_only=True)

    with torch.no_grad():
        run.trainer.ac.value_head.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"non-finite weights \(value_head.weight\)"):
        run.trainer._save_checkpoint([])
    assert not (run.run_dir / "trainer" / "checkpoint-4").exists()


def test_a_deepspeed_checkpoint_resumes_only_with_the_processes_that_wrote_it(tmp_path: Path) -> None:
    """Each process's RNG streams and DeepSpeed's optimizer partitions are per process: a checkpoint
    written by 2 processes cannot resume exactly on 4, nor a one-process checkpoint under DeepSpeed."""
    (tmp_path / ppo_checkpoint.DEEPSPEED_TAG).mkdir()
    for rank in (0, 1):
        (tmp_path / ppo_checkpoint.rank_state_name(rank)).write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"holds 2 processes' state; this run has 4 processes .* same --nproc"):
        ppo_checkpoint.read_shard(tmp_path, None, None, 0, 4)
    single = tmp_path / "single"
    single.mkdir()
    (single / ppo_checkpoint.STATE).write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no DeepSpeed shards \(a one-process checkpoint\?\)"):
        ppo_checkpoint.read_shard(single, None, None, 0, 2)
