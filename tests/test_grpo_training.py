"""GRPO end to end on a tiny random-init model (3 steps, CPU): what trains, what is saved, what is logged.

As in TRL's own trainer tests: every trainable (LoRA) parameter must change and every frozen base
parameter must stay bitwise equal. Three steps, not one: B starts at zero, so A's gradient is zero on
the first step and A can only move from the second step on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from rl_lora.config.schema import validate
from rl_lora.launch.runner import finish_run, prepare_run, run_recipe
from tests_support import tiny_raw

# One pytest-xdist worker for the file (--dist loadgroup): its tests share a run trained once.
pytestmark = pytest.mark.xdist_group("grpo_training")


def _snapshot(model: torch.nn.Module) -> dict[str, tuple[bool, torch.Tensor]]:
    return {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory):
    config = validate(tiny_raw(tmp_path_factory.mktemp("runs")))
    run = prepare_run(config)
    before = _snapshot(run.trainer.model)
    run.trainer.train()
    after = _snapshot(run.trainer.model)
    result = finish_run(run, train_seconds=0.0)
    return run, before, after, result


def test_every_lora_param_changed_and_base_is_bitwise_unchanged(lora_run) -> None:
    _, before, after, _ = lora_run
    trainable = [n for n, (grad, _) in before.items() if grad]
    frozen = [n for n, (grad, _) in before.items() if not grad]
    assert trainable and all("lora_" in n for n in trainable)
    # all attention and MLP linears of all 4 layers carry an adapter (A and B each)
    assert len(trainable) == 4 * 7 * 2
    unchanged = [n for n in trainable if torch.equal(before[n][1], after[n][1])]
    assert not unchanged, f"LoRA parameters that did not train: {unchanged}"
    moved = [n for n in frozen if not torch.equal(before[n][1], after[n][1])]
    assert not moved, f"frozen base parameters that changed: {moved}"


def test_run_folder_contents(lora_run) -> None:
    run, _, _, result = lora_run
    folder = result.run_dir
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["lora"]["rank"] == 1
    assert config["resolved"]["lr"] == pytest.approx(1.5e-2)  # 15 x 1e-3: a run under 100 steps
    assert "15 x" in config["resolved"]["lr_reason"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["trainable_params"] == 10_240  # 4 layers x (4 x 256 + 3 x 512) x rank 1
    assert summary["total_params"] == 865_920 + 10_240
    assert 0.0 <= summary["start_accuracy"] <= 1.0 and 0.0 <= summary["final_accuracy"] <= 1.0
    assert summary["peak_rss_bytes"] > 0
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("loss", "reward", "step_time", "tokens_per_s", "peak_rss_bytes", "trainable_params",
                "total_params", "optimizer_bytes", "param_bytes"):
        assert all(key in r for r in steps), key
    assert "eval/accuracy" in records[0] and "eval/accuracy" in steps[1] and "eval/accuracy" in steps[2]
    # AdamW keeps two fp32 moments per trainable parameter.
    assert steps[-1]["optimizer_bytes"] == 2 * 4 * 10_240
    assert not (folder / "trainer").exists()
    assert not list(folder.rglob("*.bin")), "weights and args are saved as safetensors/json only"


def test_saved_adapter_loads_with_plain_peft_and_reproduces_logits(lora_run) -> None:
    run, _, _, result = lora_run
    adapter = result.run_dir / "adapter"
    base = AutoModelForCausalLM.from_pretrained(result.summary["base_model"])
    loaded = PeftModel.from_pretrained(base, str(adapter)).eval()
    trained = run.trainer.model.eval()
    batch = run.tokenizer(["12+35=", "99+99=", "10+1="], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = trained(**batch).logits
        got = loaded(**batch).logits
    assert (expected - got).abs().max().item() <= 1e-5


def test_full_parameter_run_trains_everything(tmp_path: Path) -> None:
    config = validate(tiny_raw(tmp_path, lora={"rank": "full"}, train={"steps": 2}))
    run = prepare_run(config)
    before = _snapshot(run.trainer.model)
    run.trainer.train()
    result = finish_run(run, train_seconds=0.0)
    assert result.summary["trainable_params"] == result.summary["total_params"] == 865_920
    assert all(grad for grad, _ in before.values())
    assert (result.run_dir / "model" / "model.safetensors").is_file()
    assert result.summary["lr"] == pytest.approx(1e-3)  # the stated LR, no multiplier


def test_wandb_offline_run_carries_rank_method_and_lr(tmp_path: Path) -> None:
    config = validate(tiny_raw(tmp_path, train={"steps": 1}, logging={"wandb": True, "wandb_group": "g1"}))
    result = run_recipe(config)
    runs = list((result.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    needles = (b"lora-r1", b"rank", b"method", b"g1")
    # wandb's service process may still be flushing the log file when finish() returns: poll briefly.
    deadline = time.time() + 30
    while True:
        blob = b"".join(f.read_bytes() for f in runs[0].glob("*.wandb"))
        if all(n in blob for n in needles) or time.time() > deadline:
            break
        time.sleep(0.2)
    for needle in needles:
        assert needle in blob, needle
