"""Several processes on CPU over gloo: GRPO under DeepSpeed ZeRO-2 and ZeRO-3 with 2 processes, and
two launcher invocations acting as two nodes. Checks: finite losses, one metrics file, the same number
of optimizer steps on every rank, identical trainable weights on every rank, a complete saved adapter."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests_support import tiny_raw

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.multiprocess


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("RL_LORA_LAUNCHED", None)
    return env


def _recipe(tmp: Path, stage: int, rank: int | str = 1) -> Path:
    raw = tiny_raw(tmp / "runs", lora={"rank": rank}, train={"steps": 3, "batch_size": 16, "threads": 1},
                   distributed={"zero_stage": stage})
    path = tmp / f"zero{stage}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _check_run(run: Path, ranks: int) -> None:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3], "one metrics file, written once (main process only)"
    assert all(math.isfinite(r["loss"]) for r in steps)
    reports = [json.loads((run / "ranks" / f"rank{i}.json").read_text()) for i in range(ranks)]
    assert {r["global_step"] for r in reports} == {3}
    assert len({r["trainable_hash"] for r in reports}) == 1, f"ranks disagree: {reports}"
    assert not any(r["empty_trainable"] for r in reports)
    assert (run / "summary.json").is_file()


@pytest.mark.parametrize("stage", [2, 3])
def test_grpo_lora_two_processes(tmp_path: Path, stage: int) -> None:
    recipe = _recipe(tmp_path, stage)
    proc = subprocess.run([sys.executable, "-m", "rl_lora.cli", "run", str(recipe), "logging.run_name=ds",
                           "--nproc", "2", "--master-port", str(29600 + stage)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "runs" / "ds"
    _check_run(run, 2)
    # the adapter saved under ZeRO is complete and loads with plain PEFT
    summary = json.loads((run / "summary.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(summary["base_model"])
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == 10_240
    trained_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in trained_b), "saved B matrices are still zero: the adapter saved empty"


def test_full_parameter_zero3_saves_a_consolidated_model(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, 3, rank="full")
    proc = subprocess.run([sys.executable, "-m", "rl_lora.cli", "run", str(recipe), "logging.run_name=full3",
                           "--nproc", "2", "--master-port", "29633"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "runs" / "full3"
    _check_run(run, 2)
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    base = AutoModelForCausalLM.from_pretrained(json.loads((run / "summary.json").read_text())["base_model"])
    assert sum(p.numel() for p in model.parameters()) == 865_920
    moved = [n for (n, p), q in zip(model.named_parameters(), base.parameters(), strict=True) if not p.equal(q)]
    assert moved, "the saved model equals the base: training or consolidation was lost"


def test_two_nodes_on_one_machine(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, 2)
    common = [sys.executable, "-m", "rl_lora.cli", "run", str(recipe), "logging.run_name=nodes",
              "--nproc", "1", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", "29655"]
    nodes = [subprocess.Popen([*common, "--node-rank", str(i)], cwd=REPO, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [n.communicate(timeout=600) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    run = tmp_path / "runs" / "nodes"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["step"] > 0] == [1, 2, 3]
    assert (run / "ranks" / "rank0.json").is_file()


@pytest.mark.parametrize(("stage", "rank"), [(2, 1), (3, "full")])
def test_dpo_two_processes(tmp_path: Path, stage: int, rank: int | str) -> None:
    raw = tiny_raw(tmp_path / "runs", lora={"rank": rank}, data={"max_operand": 30, "eval_size": 20},
                   train={"steps": 3, "batch_size": 8, "threads": 1}, distributed={"zero_stage": stage})
    raw = {k: v for k, v in raw.items() if k not in ("grpo", "reward")} | {"algorithm": "dpo"}
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "rl_lora.cli", "run", str(recipe), "logging.run_name=dpo",
                           "--nproc", "2", "--master-port", str(29680 + stage)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_run(tmp_path / "runs" / "dpo", 2)


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_with_two_processes_reproduces_the_adapter(tmp_path: Path, stage: int) -> None:
    import signal
    import time

    raw = tiny_raw(tmp_path / "runs", train={"steps": 8, "batch_size": 16, "threads": 1, "save_every": 2,
                                             "eval_every": 3}, distributed={"zero_stage": stage})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    base = [sys.executable, "-m", "rl_lora.cli", "run", str(recipe), "--nproc", "2"]
    whole = subprocess.run([*base, "logging.run_name=whole", "--master-port", str(29720 + stage)], cwd=REPO,
                           env=_env(), capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-4000:]

    cut = tmp_path / "runs" / "cut"
    proc = subprocess.Popen([*base, "logging.run_name=cut", "--master-port", str(29730 + stage)], cwd=REPO,
                            env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (cut / "checkpoints" / "step_000002" / "manifest.json").exists():
        time.sleep(0.05)
    # torchrun's workers run in sessions of their own: kill -9 every process of this run by its name.
    os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-9", "-f", "logging.run_name=cut"], check=False)
    proc.wait()
    time.sleep(0.5)
    assert not (cut / "summary.json").exists(), "the run finished before it could be killed"
    resumed = subprocess.run([*base, "--resume", str(cut), "--master-port", str(29740 + stage)], cwd=REPO,
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a = [json.loads(x) for x in (tmp_path / "runs" / "whole" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("loss"), r.get("reward")) for r in a] == [(r["step"], r.get("loss"), r.get("reward"))
                                                                         for r in b]
    same = json.loads((tmp_path / "runs" / "whole" / "ranks" / "rank0.json").read_text())["trainable_hash"]
    assert json.loads((cut / "ranks" / "rank0.json").read_text())["trainable_hash"] == same
    assert json.loads((cut / "ranks" / "rank1.json").read_text())["trainable_hash"] == same
