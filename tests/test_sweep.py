"""Sweeps: every (rank, seed) runs once, a killed sweep resumes only what is missing, and the report
is computed from the logged figures (plots, table, verdicts)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import yaml

from rl_lora.config.schema import ConfigError, load_recipe
from rl_lora.study.report import area_under_curve, steps_to, write_report
from rl_lora.study.sweep_plan import Arm, SweepPoint, parse_ranks, plan_arms, points_for
from tests_support import tiny_raw

REPO = Path(__file__).resolve().parent.parent


def test_plan_and_names() -> None:
    config = load_recipe(REPO / "recipes" / "grpo_arithmetic.yaml")
    points = points_for(config, plan_arms(config, [1, "full"]), [1, 2])
    assert [p.name for p in points] == ["r1-all-b64-lr0.001-s1", "r1-all-b64-lr0.001-s2", "full-b64-lr0.0001-s1",
                                        "full-b64-lr0.0001-s2"]
    assert points[0].overrides() == ["lora.rank=1", "train.seed=1"]  # the rule's LR: no LR override
    assert SweepPoint(Arm(4), 3, 5e-3).overrides() == ["lora.rank=4", "train.seed=3", "lora.lr=0.005"]
    assert SweepPoint(Arm("full"), 1, 2e-4).overrides() == ["lora.rank=full", "train.seed=1", "train.lr=0.0002"]


@pytest.mark.parametrize("bad", ["0", "one", ""])
def test_bad_ranks(bad: str) -> None:
    with pytest.raises(ConfigError, match="--ranks"):
        parse_ranks(bad)


def test_curve_figures_by_hand() -> None:
    """Trapezoid over steps 0,10,20 with accuracy 0, .5, 1: area (10*.25 + 10*.75) = 10, / 20 steps = 0.5."""
    assert area_under_curve([0, 10, 20], [0.0, 0.5, 1.0]) == pytest.approx(0.5)
    assert steps_to([0, 10, 20], [0.0, 0.5, 1.0], 0.5) == 10
    assert steps_to([0, 10], [0.0, 0.1], 0.5) is None


def _sweep_cmd(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "rl_lora.cli", "sweep", str(recipe), "--ranks", "1,full", "--seeds", "1,2",
            "--output-dir", str(out), "--name", "s"]


@pytest.mark.slow
def test_killed_sweep_resumes_only_missing_runs_and_reports(tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_raw(tmp_path / "unused", train={"steps": 2}, logging={"wandb": True})))
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "WANDB_MODE": "offline"}
    runs = tmp_path / "out" / "s" / "runs"

    proc = subprocess.Popen(_sweep_cmd(recipe, tmp_path / "out"), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    first = "r1-all-b16-lr0.015-s1"  # tiny recipe: train.lr 1e-3, 2 steps, so the rule's short-run 15x
    while time.time() < deadline and not (runs / first / "summary.json").exists():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 the sweep and the run it is in the middle of
    proc.wait()
    done_before = {p.parent.name for p in runs.glob("*/summary.json")}
    assert first in done_before and len(done_before) < 4
    first_mtime = (runs / first / "summary.json").stat().st_mtime

    result = subprocess.run(_sweep_cmd(recipe, tmp_path / "out"), cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{4 - len(done_before)} finished, {len(done_before)} already done, 0 failed" in result.stdout
    assert (runs / first / "summary.json").stat().st_mtime == first_mtime  # not redone

    sweep = tmp_path / "out" / "s"
    for name in ("report.md", "report.html", "accuracy.png", "reward.png", "cost.png"):
        assert (sweep / name).is_file(), name
    for name in ("accuracy.png", "reward.png", "cost.png"):
        assert plt.imread(sweep / name).shape[0] > 100  # a real image
    text = (sweep / "report.md").read_text()
    assert "| lora-r1 | 2 |" in text and "| full | 2 |" in text
    full_row = [line for line in text.splitlines() if line.startswith("| full |")][-1]  # the cost table's
    assert full_row.rstrip(" |").endswith("2.00")  # AdamW: optimizer bytes = 2 x fp32 trainable bytes
    assert "data:image/png;base64," in (sweep / "report.html").read_text()

    # every run has an offline W&B run grouped under the sweep, with rank, method, LR and seed in its config
    for run in runs.iterdir():
        if run.is_dir():
            blobs = list(run.glob("wandb/offline-run-*/*.wandb"))
            assert blobs, run
            data = blobs[0].read_bytes()
            for needle in (b'"s"', b"rank", b"method", b"seed", b'"lr"'):
                assert needle in data, (run.name, needle)
    summaries = [json.loads(p.read_text()) for p in runs.glob("*/summary.json")]
    assert {s["method"] for s in summaries} == {"lora-r1", "full"}

    # the records (rl_lora/study/records.py): both sweeps' manifests kept, sweep.json the first's, every run's score
    manifests = sorted((sweep / "manifests").glob("sweep-*.json"))
    assert len(manifests) == 2
    first_manifest = json.loads(manifests[0].read_text())
    assert json.loads((sweep / "sweep.json").read_text()) == first_manifest  # never overwritten by the second
    assert first_manifest["command"][1:3] == ["sweep", str(recipe)] and first_manifest["versions"]["torch"]
    assert first_manifest["utc"].endswith("Z") and "git" in first_manifest
    with (sweep / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run"] for r in rows) == sorted(p.name for p in runs.iterdir() if p.is_dir())
    assert {r["status"] for r in rows} == {"finished"} and all(float(r["score"]) >= 0 for r in rows)


def test_report_needs_finished_runs(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    with pytest.raises(Exception, match="no finished run"):
        write_report(tmp_path)
