"""Several processes on CPU over gloo: GRPO and DPO training under DeepSpeed ZeRO-2 and ZeRO-3 with 2
processes, reward-model training under ZeRO-3, and two launcher invocations acting as two nodes. Checks:
finite losses, one metrics file, the same number of optimizer steps on every rank, identical trainable
weights on every rank, a complete saved adapter, ZeRO-3's per-process memory figures against one
process's, and every run's logged per-process state bytes equal to what `rl-lora plan` models for it
(tests_support.planned_bytes).

Every launch takes a free port (bound to port 0, the kernel picks): fixed ports collide when two test
sessions run on one machine at once, and the second launcher then fails to bind its rendezvous store.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from reward_models.learned import LearnedReward
from tests_support import free_port, logged_bytes, planned_bytes, subprocess_env, tiny_raw

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.multiprocess
BUILTIN_PARAMS = 865_920  # the built-in causal model's parameters (fp32)




def _command(recipe: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "rl_lora.cli", "run", str(recipe), *args, "--master-port", str(free_port())]


# Seconds a test's launch may take (the launcher, torchrun and its workers); a launch past it fails the test with
# every process of it killed. The recipes' distributed.timeout (COLLECTIVE_TIMEOUT) is well under it, so a stalled
# process fails the run with its own line first.
LAUNCH_TIMEOUT = 600
COLLECTIVE_TIMEOUT = 300


def _run_launch(command: list[str], env: dict[str, str] | None = None,
                timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a launch to its end, or kill it and everything below it (torchrun's workers have sessions of their
    own, so killing the launcher alone would leave them running) and fail the test at ``timeout``."""
    proc = subprocess.Popen(command, cwd=REPO, env=env or subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"the launch ran past {timeout} s and was killed: {err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _launch(recipe: Path, *args: str) -> None:
    """``rl-lora run RECIPE ARGS`` on 2 processes; fails the test with the launcher's stderr."""
    proc = _run_launch(_command(recipe, *args, "--nproc", "2"))
    assert proc.returncode == 0, proc.stderr[-4000:]


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _recipe(tmp: Path, stage: int, rank: int | str = 1) -> Path:
    raw = tiny_raw(tmp / "runs", lora={"rank": rank}, train={"steps": 3, "batch_size": 16, "threads": 1},
                   distributed={"zero_stage": stage, "timeout": COLLECTIVE_TIMEOUT})
    path = tmp / f"zero{stage}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _preference_recipe(tmp: Path, algorithm: str, stage: int, rank: int | str) -> Path:
    """The tiny recipe as DPO or reward-model training: 1..30 operands, 8 pairs a step, 3 steps."""
    raw = tiny_raw(tmp / "runs", lora={"rank": rank}, data={"max_operand": 30, "eval_size": 20},
                   train={"steps": 3, "batch_size": 8, "threads": 1},
                   distributed={"zero_stage": stage, "timeout": COLLECTIVE_TIMEOUT})
    raw = {k: v for k, v in raw.items() if k not in ("grpo", "reward")} | {"algorithm": algorithm}
    path = tmp / f"{algorithm}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it, parents first (so none can start another).

    torchrun starts its workers in sessions of their own, so killing the launcher's process group
    misses them; a name pattern (pkill -f) would also kill another test session's runs.
    """
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process ended while we read
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    doomed, queue = [], [pid]
    while queue:
        doomed.append(queue.pop(0))
        queue += children.get(doomed[-1], [])
    for p in doomed:
        with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
            os.kill(p, signal.SIGKILL)


def _check_run(run: Path, ranks: int, steps: int = 3) -> None:
    records = [r for r in _records(run) if r["step"] > 0]
    assert [r["step"] for r in records] == list(range(1, steps + 1)), "one metrics file, written by the main process"
    assert all(math.isfinite(r["loss"]) for r in records)
    reports = [json.loads((run / "ranks" / f"rank{i}.json").read_text()) for i in range(ranks)]
    assert {r["global_step"] for r in reports} == {steps}
    assert len({r["trainable_hash"] for r in reports}) == 1, f"ranks disagree: {reports}"
    assert not any(r["empty_trainable"] for r in reports)
    assert (run / "summary.json").is_file()


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """stage -> the folder of a 4-step rank-1 GRPO run on 2 processes, sealing a checkpoint every 2 steps.

    Made once per stage and shared by the GRPO test and the resume test (each launch costs ~30 CPU-s, measured).
    """
    made: dict[int, Path] = {}

    def run_for(stage: int) -> Path:
        if stage not in made:
            tmp = tmp_path_factory.mktemp(f"lora-zero{stage}")
            raw = tiny_raw(tmp / "runs", train={"steps": 4, "batch_size": 16, "threads": 1, "save_every": 2,
                                                "eval_every": 3}, distributed={"zero_stage": stage})
            (tmp / "r.yaml").write_text(yaml.safe_dump(raw))
            _launch(tmp / "r.yaml", "logging.run_name=whole")
            made[stage] = tmp
        return made[stage]

    return run_for


# Tests sharing a module fixture's runs stay on one worker under pytest-xdist (--dist loadgroup), so each run is
# launched once; every other test goes to whichever worker is free.
SHARED_LORA_RUNS = pytest.mark.xdist_group("distributed-lora-runs")
SHARED_FULL_RUN = pytest.mark.xdist_group("distributed-full-zero3")


@SHARED_LORA_RUNS
@pytest.mark.parametrize("stage", [2, 3])
def test_grpo_lora_two_processes(lora_runs: Callable[[int], Path], stage: int) -> None:
    run = lora_runs(stage) / "runs" / "whole"
    _check_run(run, 2, steps=4)
    assert logged_bytes(run) == planned_bytes(yaml.safe_load((lora_runs(stage) / "r.yaml").read_text()), devices=2)
    # the adapter saved under ZeRO is complete and loads with plain PEFT
    summary = json.loads((run / "summary.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(summary["base_model"])
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == 10_240
    trained_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in trained_b), "saved B matrices are still zero: the adapter saved empty"


@pytest.fixture(scope="module")
def full_zero3_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full-parameter GRPO under ZeRO-3 on 2 processes, 3 steps (shared by two tests: launches are slow)."""
    tmp = tmp_path_factory.mktemp("full3")
    _launch(_recipe(tmp, 3, rank="full"), "logging.run_name=full3")
    return tmp / "runs" / "full3"


def _planned_for(run: Path) -> dict[str, int]:
    """The plan's per-process bytes for the 2-process run in ``run`` (its recipe is the one YAML beside runs/)."""
    (recipe,) = run.parent.parent.glob("*.yaml")
    return planned_bytes(yaml.safe_load(recipe.read_text()), devices=2)


@SHARED_FULL_RUN
def test_full_parameter_zero3_saves_a_consolidated_model(full_zero3_run: Path) -> None:
    run = full_zero3_run
    _check_run(run, 2)
    assert logged_bytes(run) == _planned_for(run)
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    base = AutoModelForCausalLM.from_pretrained(json.loads((run / "summary.json").read_text())["base_model"])
    assert sum(p.numel() for p in model.parameters()) == BUILTIN_PARAMS
    moved = [n for (n, p), q in zip(model.named_parameters(), base.parameters(), strict=True) if not p.equal(q)]
    assert moved, "the saved model equals the base: training or consolidation was lost"


@SHARED_FULL_RUN
def test_zero3_splits_parameter_and_optimizer_bytes(full_zero3_run: Path) -> None:
    """The logged per-process bytes (rl_lora/training/memory.py) of full-parameter training on 2 processes.

    One process holds fp32 weights (4 bytes each), their gradients, and Adam's two fp32 moments (8 bytes each):
    tests/test_plan.py checks that to the byte for single-process full runs of every algorithm (and ZeRO-0 holds
    the same in every process). ZeRO-3 holds half of the weights (plus the few norm weights it keeps whole),
    half the gradients and half of Adam's state, so parameter + optimizer bytes must be at most 0.6x one
    process's, and at least half of them (a counting that lost what DeepSpeed keeps would come out lower).
    """
    zero3 = _records(full_zero3_run)[-1]
    n = BUILTIN_PARAMS
    whole = 4 * n + 8 * n  # one process's parameter + optimizer bytes
    state3 = zero3["param_bytes"] + zero3["optimizer_bytes"]
    assert state3 <= 0.6 * whole, f"ZeRO-3 holds {state3:,} bytes per process, one process {whole:,}"
    assert zero3["param_bytes"] >= 2 * n and zero3["optimizer_bytes"] >= 4 * n and zero3["grad_bytes"] >= 2 * n
    assert zero3["grad_bytes"] < 4 * n


def test_two_nodes_on_one_machine(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, 2)
    common = _command(recipe, "logging.run_name=nodes", "--nproc", "1", "--nnodes", "2", "--master-addr",
                      "127.0.0.1")
    nodes = [subprocess.Popen([*common, "--node-rank", str(i)], cwd=REPO, env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [n.communicate(timeout=600) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    run = tmp_path / "runs" / "nodes"
    assert [r["step"] for r in _records(run) if r["step"] > 0] == [1, 2, 3]
    assert (run / "ranks" / "rank0.json").is_file()


@pytest.mark.parametrize(("stage", "lora", "trained"), [
    (3, {"adapter": "vera", "rank": 256}, 12_800),
    (3, {"adapter": "dora", "rank": 1}, 15_872),
    (2, {"adapter": "tinylora", "adapter_options": {"u": 13, "weight_tying": 1.0}}, 13),
    (3, {"adapter": "miss", "rank": 16, "adapter_options": {"init_weights": "mini", "mini_r": 8}}, 3_584),
], ids=["vera-r256-zero3", "dora-r1-zero3", "tinylora-tied-zero2", "miss-mini-zero3"])
def test_other_adapter_types_two_processes(tmp_path: Path, stage: int, lora: dict, trained: int) -> None:
    """PEFT's other adapter types under ZeRO (docs/adapters.md): the same checks as LoRA's, the trained count
    the type's, the saved adapter complete (it loads with plain PEFT, every value finite), the plan's bytes."""
    raw = tiny_raw(tmp_path / "runs", lora=lora, train={"steps": 3, "batch_size": 16, "threads": 1},
                   distributed={"zero_stage": stage, "timeout": COLLECTIVE_TIMEOUT})
    recipe = tmp_path / "typed.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    _launch(recipe, "logging.run_name=typed")
    run = tmp_path / "runs" / "typed"
    _check_run(run, 2)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainable_params"] == trained
    base = AutoModelForCausalLM.from_pretrained(summary["base_model"])
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
    prefix = "lora_" if lora["adapter"] == "dora" else f"{lora['adapter']}_"
    saved = {n: p for n, p in model.named_parameters() if prefix in n}
    assert saved and all(p.isfinite().all() for p in saved.values())
    assert logged_bytes(run) == _planned_for(run)


@pytest.mark.parametrize(("stage", "rank"), [(2, 1), (3, "full")])
def test_dpo_two_processes(tmp_path: Path, stage: int, rank: int | str) -> None:
    _launch(_preference_recipe(tmp_path, "dpo", stage, rank), "logging.run_name=dpo")
    _check_run(tmp_path / "runs" / "dpo", 2)
    assert logged_bytes(tmp_path / "runs" / "dpo") == _planned_for(tmp_path / "runs" / "dpo")


def test_a_stalled_process_fails_the_run_with_one_line_in_bounded_time(tmp_path: Path) -> None:
    """Issue #28 item 9: a process that stops answering (tests/stall_hook: rank 1 sleeps after step 1) makes the
    others' next collective wait; past distributed.timeout it fails the run with one line naming the step,
    torchrun ends the stalled process, and the launch returns non-zero instead of hanging."""
    raw = yaml.safe_load(_recipe(tmp_path, 2).read_text())
    raw["distributed"]["timeout"] = 20
    recipe = tmp_path / "stall.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    env = {**subprocess_env(), "RL_LORA_TEST_STALL_STEP": "1", "RL_LORA_TEST_STALL_RANK": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests" / "stall_hook"), env["PYTHONPATH"]])
    started = time.time()
    proc = _run_launch(_command(recipe, "logging.run_name=stall", "--nproc", "2"), env=env, timeout=400)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("rl-lora: error:")]
    assert lines and lines[0].startswith(
        "rl-lora: error: step 2 of 3: process 0 of 2 waited past distributed.timeout (20 s)"), proc.stderr[-3000:]
    assert time.time() - started < 400
    assert not (tmp_path / "runs" / "stall" / "summary.json").exists()


@pytest.mark.parametrize("stage", [3])
def test_reward_model_two_processes(tmp_path: Path, stage: int) -> None:
    """Reward-model training (rank-1 LoRA + the one-logit ``score`` head) under ZeRO-3, where both are split
    between the processes and gathered to save (ZeRO-2 with adapters is run by GRPO, DPO and PPO here)."""
    _launch(_preference_recipe(tmp_path, "reward", stage, 1), "logging.run_name=rm")
    run = tmp_path / "runs" / "rm"
    _check_run(run, 2)
    assert logged_bytes(run) == _planned_for(run)
    # complete: 56 LoRA tensors (A and B on 7 linears x 4 layers) and the trained head, saved whole
    # as PEFT's modules_to_save, none empty
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert "score" in config["modules_to_save"] and config["task_type"] == "SEQ_CLS"
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    assert sum("lora_" in k for k in tensors) == 56
    assert tensors["base_model.model.score.weight"].shape == (1, 128)
    assert all(t.numel() and t.isfinite().all() for t in tensors.values())
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k or "score" in k)
    scores = LearnedReward(run / "adapter")(["12+15=", "3+4="], ["27", "8"])
    assert len(scores) == 2 and all(math.isfinite(x) for x in scores)


@SHARED_LORA_RUNS
@pytest.mark.parametrize("stage", [3])
def test_resume_with_two_processes_reproduces_the_adapter(lora_runs: Callable[[int], Path], stage: int) -> None:
    """The uninterrupted run against the same recipe killed (kill -9, every process) after its step-2
    checkpoint and resumed: the same per-step loss and reward, the same trained weights on both ranks. Under
    ZeRO-3, whose checkpoints hold every process's slice; a ZeRO-2 checkpoint is resumed on 2 processes by
    tests/test_ppo_distributed.py."""
    tmp = lora_runs(stage)
    recipe = tmp / "r.yaml"
    cut = tmp / "runs" / "cut"
    proc = subprocess.Popen(_command(recipe, "logging.run_name=cut", "--nproc", "2"), cwd=REPO, env=subprocess_env(),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (cut / "checkpoints" / "step_000002" / "manifest.json").exists():
        time.sleep(0.05)
    _kill_tree(proc.pid)  # the launcher, torchrun and every worker
    proc.wait()
    time.sleep(0.5)
    assert not (cut / "summary.json").exists(), "the run finished before it could be killed"
    _launch(recipe, "--resume", str(cut))
    a = _records(tmp / "runs" / "whole")
    b = _records(cut)
    assert [(r["step"], r.get("loss"), r.get("reward")) for r in a] == [(r["step"], r.get("loss"), r.get("reward"))
                                                                         for r in b]
    same = json.loads((tmp / "runs" / "whole" / "ranks" / "rank0.json").read_text())["trainable_hash"]
    assert json.loads((cut / "ranks" / "rank0.json").read_text())["trainable_hash"] == same
    assert json.loads((cut / "ranks" / "rank1.json").read_text())["trainable_hash"] == same


def test_the_main_process_decides_keep_best_and_stop_without_deepspeed(tmp_path: Path) -> None:
    """guard.keep_best and guard.action: stop on 2 processes without DeepSpeed, their held-out figures made to
    disagree (tests/scripted_task.py): process 0 sees its best at step 1 and over-optimization at step 3,
    process 1 a new best at every step and nothing wrong. Both follow process 0: every process stops at step 3,
    and best/ holds step 1's policy (the step-1 checkpoint's adapter), the step summary.json names."""
    scripts = [[0.5, 0.6, 0.6, 0.2], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]]
    raw = tiny_raw(tmp_path / "runs", data={"task": "scripted_task:make_task", "task_kwargs": {"scripts": scripts}},
                   reward={"functions": [{"name": "scripted_task:rising"}]},
                   train={"steps": 6, "batch_size": 16, "threads": 1, "eval_every": 1, "save_every": 1,
                          "keep_last": 10},
                   guard={"action": "stop", "keep_best": True, "patience": 1})
    recipe = tmp_path / "guard.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen(_command(recipe, "logging.run_name=guard", "--nproc", "2"), cwd=REPO, env=subprocess_env(),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # processes that decided differently wait on each other for good
        _kill_tree(proc.pid)
        proc.communicate()
        pytest.fail("the 2-process run with guard.action: stop hung")
    assert proc.returncode == 0, err[-4000:]
    run = tmp_path / "runs" / "guard"
    reports = [json.loads((run / "ranks" / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["global_step"] for r in reports] == [3, 3]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trained_steps"] == 3 and summary["overoptimization"][0]["step"] == 3
    assert summary["best_saved"]["step"] == summary["best_accuracy_step"] == 1
    best = load_file(run / "best" / "adapter_model.safetensors")
    at_step_1 = load_file(run / "checkpoints" / "step_000001" / "adapter_model.safetensors")
    assert best.keys() == at_step_1.keys() and all(best[k].equal(at_step_1[k]) for k in best)
    assert (out + err).count("over-optimization at step 3") == 1  # said once, by the main process
