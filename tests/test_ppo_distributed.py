"""PPO under DeepSpeed with 2 processes on CPU over gloo, ZeRO-2 and ZeRO-3, rank-1 LoRA (policy and
value adapters on one shared base, one engine). Checks: finite losses, one metrics file with steps 1-4
(main process only), both ranks at step 4 with identical trainable weights, the logged per-process state
bytes equal to the plan's, and a saved policy adapter that is complete under ZeRO-3 (gathered before
saving) and loads with plain PEFT, value adapter beside it.
Full-parameter PPO under ZeRO-3 (policy + critic copy in the engine, the frozen reference outside it)
saves a consolidated policy. Each uninterrupted run is launched once and read by every check of its
(stage, rank). Checkpoints under ZeRO-2 (rank 1) and ZeRO-3 (full): a run killed (SIGKILL) right after its
step-2 checkpoint and resumed on 2 processes logs the uninterrupted run's figures and ends with its weights;
a NaN in one process's ZeRO-3 partition makes both refuse to save, naming the parameter.

Each launch takes a free port (bound to port 0, the kernel picks), as tests/test_distributed.py does:
fixed ports collide when two test sessions share a machine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests_support import free_port, logged_bytes, planned_bytes, subprocess_env, tiny_raw

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.multiprocess
LORA_PARAMS = 10_240  # rank 1 on every linear of the built-in model's 4 layers, one adapter




def _recipe(tmp: Path, stage: int, rank: int | str = 1, **train: int) -> Path:
    # 16 completions a step = 4 prompts x 4 samples, 2 prompts per process; minibatches of 8 = 4 per process.
    raw = tiny_raw(tmp / "runs", lora={"rank": rank},
                   train={"steps": 3, "batch_size": 16, "eval_every": 3, "threads": 1, **train},
                   ppo={"samples_per_prompt": 4, "max_completion_length": 4, "epochs": 1, "minibatch_size": 8},
                   distributed={"zero_stage": stage})
    raw["algorithm"] = "ppo"
    del raw["grpo"]  # a PPO recipe has no GRPO section
    path = tmp / f"ppo_zero{stage}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _check_run(run: Path, ranks: int, last: int = 4) -> None:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in steps] == list(range(1, last + 1)), "one metrics file, written once (main process only)"
    assert all(math.isfinite(r[key]) for r in steps for key in ("loss", "loss/policy", "loss/value", "reward"))
    assert steps[-1]["num_tokens"] > steps[0]["num_tokens"] > 0
    reports = [json.loads((run / "ranks" / f"rank{i}.json").read_text()) for i in range(ranks)]
    assert {r["global_step"] for r in reports} == {last}
    assert len({r["trainable_hash"] for r in reports}) == 1, f"ranks disagree: {reports}"
    assert not any(r["empty_trainable"] for r in reports)
    assert (run / "summary.json").is_file()


def _run(recipe: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rl_lora.cli", "run", str(recipe), *args, "--nproc", "2",
                           "--master-port", str(free_port())],
                          cwd=REPO, env=env or subprocess_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def whole_runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int, int | str], Path]:
    """(stage, rank) -> the folder of an uninterrupted 4-step PPO run on 2 processes sealing a checkpoint every
    2 steps (its recipe beside runs/): made once and read by the run's own checks, the plan's bytes check and
    the resume test (each launch costs ~15 CPU-s)."""
    made: dict[tuple[int, int | str], Path] = {}

    def run_for(stage: int, rank: int | str) -> Path:
        if (stage, rank) not in made:
            tmp = tmp_path_factory.mktemp(f"ppo-zero{stage}-{rank}")
            proc = _run(_recipe(tmp, stage, rank, steps=4, save_every=2, eval_every=4), "logging.run_name=whole")
            assert proc.returncode == 0, proc.stderr[-4000:]
            made[(stage, rank)] = tmp
        return made[(stage, rank)]

    return run_for


def _shared(stage: int, rank: int | str) -> pytest.MarkDecorator:
    """Tests reading one (stage, rank)'s run stay on one pytest-xdist worker (--dist loadgroup): one launch."""
    return pytest.mark.xdist_group(f"ppo-whole-{stage}-{rank}")


@pytest.mark.parametrize("stage", [pytest.param(2, marks=_shared(2, 1)), pytest.param(3, marks=_shared(3, 1))])
def test_ppo_lora_two_processes(whole_runs: Callable[[int, int | str], Path], stage: int) -> None:
    tmp = whole_runs(stage, 1)
    run = tmp / "runs" / "whole"
    _check_run(run, 2)
    assert logged_bytes(run) == planned_bytes(yaml.safe_load((tmp / f"ppo_zero{stage}.yaml").read_text()), devices=2)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ppo_param_bytes_vs_base"] <= 1.1  # one shared base, whole sizes even under ZeRO-3
    base = AutoModelForCausalLM.from_pretrained(summary["base_model"])
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
    model.load_adapter(str(run / "adapter" / "value"), adapter_name="value")
    for adapter in ("default", "value"):
        lora = {n: p for n, p in model.named_parameters() if "lora_" in n and f".{adapter}." in n}
        assert sum(p.numel() for p in lora.values()) == LORA_PARAMS, adapter
        trained_b = [p for n, p in lora.items() if "lora_B" in n]
        assert all(p.abs().sum() > 0 for p in trained_b), f"{adapter}: B matrices still zero, saved empty"


@_shared(3, "full")
def test_ppo_full_parameter_zero3_saves_a_consolidated_policy(whole_runs: Callable[[int, int | str], Path]) -> None:
    tmp = whole_runs(3, "full")
    run = tmp / "runs" / "whole"
    _check_run(run, 2)
    assert logged_bytes(run) == planned_bytes(yaml.safe_load((tmp / "ppo_zero3.yaml").read_text()), devices=2)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ppo_param_bytes_vs_base"] >= 3.0  # policy, critic and reference, counted whole
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    base = AutoModelForCausalLM.from_pretrained(summary["base_model"])
    assert sum(p.numel() for p in model.parameters()) == 865_920
    moved = [n for (n, p), q in zip(model.named_parameters(), base.parameters(), strict=True) if not p.equal(q)]
    assert moved, "the saved policy equals the base: training or consolidation was lost"


# Resume is checked on ZeRO-2 with rank-1 adapters (policy and value adapters, their optimizer state) and on ZeRO-3
# full-parameter (partitioned engine state, the critic copy): each stage and each kind of trained state once. The
# fourth pair, ZeRO-3 with adapters, takes the same DeepSpeed checkpoint path as both and cost ~100 s a suite.
@pytest.mark.parametrize(("stage", "rank"), [pytest.param(*key, marks=_shared(*key)) for key in ((2, 1), (3, "full"))])
def test_ppo_resume_with_two_processes_reproduces_the_run(whole_runs: Callable[[int, int | str], Path], stage: int,
                                                          rank: int | str) -> None:
    """4 steps, a checkpoint every 2: uninterrupted, against killed right after sealing step 2 and resumed.

    The main process SIGKILLs itself the moment checkpoint 2 is sealed (tests/kill_hook, the same hook as
    the one-process resume tests); the other process is then waiting at the barrier after the seal, and
    torchrun tears it down. The resumed run must log the same figures and end with the same weights on
    both ranks: every process's RNG streams, data position and DeepSpeed shards came back.
    """
    tmp_path = whole_runs(stage, rank)
    recipe = tmp_path / f"ppo_zero{stage}.yaml"
    cut = tmp_path / "runs" / "cut"
    kill_env = {**subprocess_env(), "RL_LORA_TEST_KILL_AFTER_STEP": "2",
                "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "kill_hook"), str(REPO / "tests")])}
    killed = _run(recipe, "logging.run_name=cut", env=kill_env)
    assert killed.returncode != 0, "the run finished: the kill hook did not fire"
    assert "Signal 9 (SIGKILL)" in killed.stderr, killed.stderr[-3000:]  # torchrun's report: rank 0 died by kill -9
    assert (cut / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert not (cut / "summary.json").exists()
    sealed = {p.name for p in (cut / "checkpoints" / "step_000002").iterdir()}
    assert {"state_rank0.pt", "state_rank1.pt", "scheduler.pt", "deepspeed", "manifest.json"} <= sealed

    resumed = _run(recipe, "--resume", str(cut))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stderr

    a = [json.loads(line) for line in (tmp_path / "runs" / "whole" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "loss", "loss/policy", "loss/value", "reward", "lr", "kl", "num_tokens")
    assert [r["step"] for r in a if r["step"] > 0] == [1, 2, 3, 4]
    assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]
    hashes = {json.loads((run / "ranks" / f"rank{i}.json").read_text())["trainable_hash"]
              for run in (tmp_path / "runs" / "whole", cut) for i in (0, 1)}
    assert len(hashes) == 1, f"weights differ between runs or ranks: {hashes}"
    assert json.loads((cut / "summary.json").read_text())["resumed_from_step"] == 2


_NAN_SCRIPT = """
import sys
from pathlib import Path

import torch
import yaml

from rl_lora.config.schema import validate
from rl_lora.utils.errors import CheckpointError
from rl_lora.launch.runner import prepare_run

trainer = prepare_run(validate(yaml.safe_load(Path(sys.argv[1]).read_text()))).trainer
trainer._prepare()
trainer.state.global_step = 1
head = trainer.ac.value_head.weight
if trainer.rank == 1:  # only rank 1's slice of the head goes bad
    with torch.no_grad():
        getattr(head, "ds_tensor", head).view(-1)[0] = float("nan")
try:
    trainer._save_checkpoint([])
    outcome = "saved"
except CheckpointError as exc:
    outcome = str(exc)
Path(sys.argv[2], f"rank{trainer.rank}.txt").write_text(outcome)
"""


def test_ppo_zero3_refuses_to_save_non_finite_weights_on_every_rank(tmp_path: Path) -> None:
    """Under ZeRO-3 each process holds a slice of every weight: a NaN in rank 1's slice only must stop
    both processes (neither writes, neither waits for the other at a barrier), naming the parameter."""
    recipe = _recipe(tmp_path, 3, save_every=1)
    (tmp_path / "script.py").write_text(_NAN_SCRIPT)
    run_dir = tmp_path / "runs" / "nan"
    run_dir.mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(tmp_path / "script.py"), str(recipe), str(tmp_path)],
                          cwd=REPO, env={**subprocess_env(), "RL_LORA_RUN_DIR": str(run_dir)},
                          capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        outcome = (tmp_path / f"rank{rank}.txt").read_text()
        assert "step 1: not saving a checkpoint with non-finite weights (value_head.weight)" in outcome, outcome
    assert not (run_dir / "trainer" / "checkpoint-1").exists()
    assert not (run_dir / "checkpoints").exists()
