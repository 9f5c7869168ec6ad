"""Resume: a run killed after a checkpoint and resumed in a new process logs the same per-step metrics
as the uninterrupted run and ends with a bit-identical adapter (CPU, fp32)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests_support import tiny_raw

REPO = Path(__file__).resolve().parent.parent
COMPARED = ("loss", "reward", "lr", "grad_norm")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "tests"), "WANDB_MODE": "disabled"}


def _recipe(tmp: Path, train: dict | None = None) -> Path:
    raw = tiny_raw(tmp / "runs", train={"steps": 8, "save_every": 2, "keep_last": 2, "eval_every": 4, **(train or {})})
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rl_lora.cli", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _records(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["step"] > 0 and "loss" in r}


@pytest.mark.slow
def test_kill_then_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    whole = _cli("run", str(recipe), "logging.run_name=whole")
    assert whole.returncode == 0, whole.stderr[-2000:]

    proc = subprocess.Popen([sys.executable, "-m", "rl_lora.cli", "run", str(recipe), "logging.run_name=cut"],
                            cwd=REPO, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cut = tmp_path / "runs" / "cut"
    deadline = time.time() + 240
    while time.time() < deadline and not (cut / "checkpoints" / "step_000004" / "manifest.json").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "summary.json").exists(), "the run finished before it could be killed"

    resumed = _cli("run", str(recipe), "--resume", str(cut))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr

    a, b = _records(tmp_path / "runs" / "whole"), _records(cut)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        for key in COMPARED:
            assert a[step].get(key) == b[step].get(key), (step, key)
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "runs" / "whole" / adapter).read_bytes() == (cut / adapter).read_bytes()
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["resumed_from_step"] >= 4
    assert len(list((cut / "checkpoints").glob("step_*"))) <= 2  # keep_last


def test_resume_refuses_a_changed_rank(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, train={"steps": 2, "save_every": 2})
    first = _cli("run", str(recipe), "logging.run_name=r")
    assert first.returncode == 0, first.stderr[-2000:]
    again = _cli("run", str(recipe), "lora.rank=2", "--resume", str(tmp_path / "runs" / "r"))
    assert again.returncode == 2
    assert "lora.rank" in again.stderr and "cannot resume" in again.stderr


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    recipe = _recipe(tmp_path)
    out = _cli("run", str(recipe), "--resume", str(tmp_path / "empty"))
    assert out.returncode == 2 and "no complete checkpoint" in out.stderr
