"""DPO and reward-model training end to end on a tiny random-init model (2-3 steps, CPU).

As for GRPO (tests/test_grpo_training.py): every trainable LoRA parameter must change and every frozen
base parameter must stay bitwise equal. Three steps, not one: B starts at zero, so A's gradient is
zero on the first step and A can only move from the second step on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from reward_models.learned import LearnedReward
from rl_lora.config.schema import validate
from tests_support import tiny_raw, train_in_process

# One pytest-xdist worker for the file (--dist loadgroup): its tests share a run trained once.
pytestmark = pytest.mark.xdist_group("preference_training")

# What both DPO runs (rank 1 and full) must log at every step.
DPO_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "lr",
            "peak_rss_bytes", "param_bytes", "optimizer_bytes", "trainable_params", "reference_param_bytes")


def _preference_raw(tmp: Path, algorithm: str, **sections: dict) -> dict:
    """The tiny recipe as DPO / reward-model training: 1..30 operands (441 problems), 8 pairs a step."""
    raw = tiny_raw(tmp, data={"max_operand": 30, "eval_size": 20}, train={"batch_size": 8, "threads": 1})
    raw = {k: v for k, v in raw.items() if k not in ("grpo", "reward")} | {"algorithm": algorithm}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_lora_trained_base_frozen(before: dict, after: dict, extra_trainable: int = 0) -> None:
    trainable = [n for n, (grad, _) in before.items() if grad]
    frozen = [n for n, (grad, _) in before.items() if not grad]
    lora = [n for n in trainable if "lora_" in n]
    assert len(lora) == 4 * 7 * 2  # A and B on all 7 linears of all 4 layers
    assert len(trainable) == len(lora) + extra_trainable
    unchanged = [n for n in trainable if torch.equal(before[n][1], after[n][1])]
    assert not unchanged, f"trainable parameters that did not train: {unchanged}"
    moved = [n for n in frozen if not torch.equal(before[n][1], after[n][1])]
    assert not moved, f"frozen base parameters that changed: {moved}"


@pytest.fixture(scope="module")
def dpo_lora_run(tmp_path_factory: pytest.TempPathFactory):
    return train_in_process(_preference_raw(tmp_path_factory.mktemp("runs"), "dpo"))


def test_dpo_lora_trains_only_the_adapter(dpo_lora_run) -> None:
    _, before, after, _ = dpo_lora_run
    _assert_lora_trained_base_frozen(before, after)


def test_dpo_run_folder_and_metrics(dpo_lora_run) -> None:
    run, _, _, result = dpo_lora_run
    summary = result.summary
    assert summary["algorithm"] == "dpo" and summary["method"] == "lora-r1"
    assert 0.0 <= summary["start_accuracy"] <= 1.0 and 0.0 <= summary["final_accuracy"] <= 1.0
    assert summary["train_pairs"] > 300 and summary["reference_param_bytes"] == 0  # reference = adapter off
    steps = [r for r in _records(result.run_dir) if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in DPO_KEYS:
        assert all(key in r for r in steps), key
    assert not list(result.run_dir.rglob("*.bin")), "weights and args are saved as safetensors/json only"
    base = AutoModelForCausalLM.from_pretrained(summary["base_model"])
    loaded = PeftModel.from_pretrained(base, str(result.run_dir / "adapter")).eval()
    batch = run.tokenizer(["12+15=", "30+30="], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert (run.trainer.model.eval()(**batch).logits - loaded(**batch).logits).abs().max() <= 1e-5


def test_dpo_full_parameter_has_a_frozen_reference_and_the_same_metrics(tmp_path: Path) -> None:
    raw = _preference_raw(tmp_path, "dpo", lora={"rank": "full"}, train={"steps": 2})
    run, before, after, result = train_in_process(raw)
    assert all(grad for grad, _ in before.values())
    assert result.summary["trainable_params"] == result.summary["total_params"] == 865_920
    assert result.summary["reference_param_bytes"] == 865_920 * 4  # one fp32 copy
    reference = run.trainer.ref_model
    assert not any(p.requires_grad for p in reference.parameters())
    steps = [r for r in _records(result.run_dir) if r["step"] > 0]
    for key in DPO_KEYS:
        assert all(key in r for r in steps), key
    assert (result.run_dir / "model" / "model.safetensors").is_file()


def test_dpo_from_a_preference_file(tmp_path: Path) -> None:
    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
            for a in range(10, 14) for b in range(10, 14)]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, _, _, result = train_in_process(_preference_raw(tmp_path / "runs", "dpo", data={"preferences": str(path)},
                                             train={"steps": 1}))
    assert (result.summary["train_pairs"], result.summary["held_out_pairs"]) == (14, 2)  # a seeded tenth held out


def test_dpo_on_user_pairs_is_judged_on_its_held_out_pairs_not_the_builtin_task(tmp_path: Path) -> None:
    """Pairs of the user's own (not arithmetic problems, no task named): the headline is DPO's implicit-reward
    accuracy on the held-out pairs, as TRL's DPOTrainer.evaluate computes it; no arithmetic accuracy anywhere."""
    rows = [{"prompt": f"{a}{b}", "chosen": f"{a}", "rejected": f"{b}"} for a in range(10, 15) for b in range(20, 24)]
    held = [{"prompt": f"{a}", "chosen": f"{a}{a}", "rejected": f"{a}0"} for a in range(30, 33)]
    path, held_path = tmp_path / "prefs.jsonl", tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held_path.write_text("".join(json.dumps(r) + "\n" for r in held))
    raw = _preference_raw(tmp_path / "runs", "dpo", data={"preferences": str(path), "eval_preferences": str(held_path)},
                          train={"steps": 2, "eval_every": 1})
    run, _, _, result = train_in_process(raw)
    summary = result.summary
    assert (summary["headline_metric"], summary["headline_unit"]) == ("rewards/accuracies", "rate")
    assert (summary["train_pairs"], summary["held_out_pairs"], summary["headline_resolution"]) == (20, 3, 1 / 3)
    for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        assert f"start_{key}" in summary and f"final_{key}" in summary, key
    assert summary["start_rewards/margins"] == 0.0  # step 0: the policy is its reference
    assert not [k for k in summary if k.endswith("_accuracy") and k != "final_train_accuracy"], summary
    records = _records(result.run_dir)
    assert not [k for r in records for k in r if k == "eval/accuracy"]
    assert [r["step"] for r in records if "eval/rewards/accuracies" in r] == [0, 1, 2]
    # The figures are TRL's own: its DPOTrainer.evaluate on the same pairs gives the same values.
    trl_figures = run.trainer.evaluate()
    for key in ("rewards/accuracies", "rewards/margins"):
        assert abs(trl_figures[f"eval_{key}"] - summary[f"final_{key}"]) <= 1e-5, key
    # Without data.eval_preferences, a seeded tenth of the user's pairs is held out, never trained on.
    config = validate({**raw, "data": {**raw["data"], "eval_preferences": None}})
    from rl_lora.algorithms.dpo import check_preferences

    _, (train, held_out), _ = check_preferences(config)
    assert (len(train), len(held_out)) == (18, 2) and not [r for r in held_out if r in train]


@pytest.fixture(scope="module")
def rm_lora_run(tmp_path_factory: pytest.TempPathFactory):
    return train_in_process(_preference_raw(tmp_path_factory.mktemp("runs"), "reward"))


def test_reward_model_lora_trains_adapter_and_head_only(rm_lora_run) -> None:
    _, before, after, _ = rm_lora_run
    # + the score head's trainable copy (PEFT's modules_to_save); the original head stays frozen
    _assert_lora_trained_base_frozen(before, after, extra_trainable=1)
    assert [n for n, (grad, _) in before.items() if grad and "lora_" not in n] == [
        "base_model.model.score.modules_to_save.default.weight"
    ]


def test_reward_model_reports_held_out_pairwise_accuracy(rm_lora_run) -> None:
    _, _, _, result = rm_lora_run
    summary = result.summary
    assert summary["algorithm"] == "reward" and summary["held_out_pairs"] > 0
    assert 0.0 <= summary["start_pairwise_accuracy"] <= 1.0 and 0.0 <= summary["final_pairwise_accuracy"] <= 1.0
    records = _records(result.run_dir)
    assert "eval/pairwise_accuracy" in records[0] and "eval/pairwise_accuracy" in records[-1]
    steps = [r for r in records if r["step"] > 0]
    for key in ("loss", "accuracy", "margin", "peak_rss_bytes", "optimizer_bytes"):
        assert all(key in r for r in steps), key


def test_saved_reward_model_scores_as_trained(rm_lora_run) -> None:
    """The adapter loads as a ``learned:`` reward and gives the trained model's scores."""
    run, _, _, result = rm_lora_run
    reward = LearnedReward(result.run_dir / "adapter")
    prompts, completions = ["12+15=", "30+30=", "1+2="], ["27", "61", "3"]
    trained, tokenizer = run.trainer.model.eval(), run.tokenizer
    from reward_models.learned import score_texts

    expected = score_texts(trained, tokenizer, prompts, completions)
    got = reward(prompts, completions, answer=["27", "60", "3"])
    assert max(abs(e - g) for e, g in zip(expected, got, strict=True)) <= 1e-5


def test_reward_model_full_parameter(tmp_path: Path) -> None:
    raw = _preference_raw(tmp_path, "reward", lora={"rank": "full"}, train={"steps": 2})
    _, before, _, result = train_in_process(raw)
    assert all(grad for grad, _ in before.values())
    assert (result.run_dir / "model" / "model.safetensors").is_file()
    scores = LearnedReward(result.run_dir / "model")(["12+15="], ["27"])
    assert len(scores) == 1


def test_reward_model_from_a_preference_file_holds_out_a_seeded_tenth(tmp_path: Path) -> None:
    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b - 1)}
            for a in range(10, 15) for b in range(10, 14)]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, _, _, result = train_in_process(_preference_raw(tmp_path / "runs", "reward", data={"preferences": str(path)},
                                             train={"steps": 1}))
    assert (result.summary["train_pairs"], result.summary["held_out_pairs"]) == (18, 2)
