"""A learned reward (a sequence-classification model) as a plug-in: scores must not depend on batch-mates.

Right padding keeps a causal model's positions and attention identical whether a text is scored alone
or beside longer and shorter texts; left padding would shift its position ids. The adapter test
starts from a non-zero LoRA B (a fresh adapter changes nothing and would hide a loading bug).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForSequenceClassification

from reward_models.learned import LearnedReward, load_reward_model, score_texts
from rl_lora.config.schema import validate
from rl_lora.launch.runner import run_recipe
from rl_lora.tasks.arithmetic.model import tiny_llama_config
from rl_lora.tasks.arithmetic.tokenizer import build_char_tokenizer
from rl_lora.tasks.rewards import resolve_reward
from rl_lora.utils.errors import RewardError
from tests_support import tiny_raw

# One pytest-xdist worker for the file (--dist loadgroup): its tests share a run trained once.
pytestmark = pytest.mark.xdist_group("learned_reward")

PROMPTS = ["1+2=", "12+35=", "99+99=", "5+5="]
COMPLETIONS = ["3", "47", "198 and some more text", "1"]


def _classifier() -> tuple[LlamaForSequenceClassification, object]:
    tokenizer = build_char_tokenizer()
    config = tiny_llama_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    config.num_labels = 1
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config).eval(), tokenizer


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = _classifier()
    folder = tmp_path_factory.mktemp("rm") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter_folder(model_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    """A rank-1 adapter with non-zero B on the model above, and the unmerged PEFT model's scores."""
    base, tokenizer = load_reward_model(model_folder)
    peft_model = get_peft_model(base, LoraConfig(r=1, lora_alpha=32, target_modules="all-linear", task_type="SEQ_CLS"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.05)
    expected = score_texts(peft_model.eval(), tokenizer, PROMPTS, COMPLETIONS)
    folder = tmp_path_factory.mktemp("rm") / "adapter"
    peft_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, expected


def test_scores_do_not_depend_on_batch_mates(model_folder: Path) -> None:
    reward = resolve_reward(f"learned:{model_folder}")
    alone = [reward([p], [c])[0] for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    together = reward(PROMPTS, COMPLETIONS)
    reversed_ = reward(PROMPTS[::-1], COMPLETIONS[::-1])[::-1]
    in_pairs = reward(PROMPTS, COMPLETIONS, batch_size=2)
    for other in (together, reversed_, in_pairs):
        assert max(abs(a - b) for a, b in zip(alone, other, strict=True)) <= 1e-5
    assert len(set(alone)) == len(alone), "distinct texts should get distinct scores"


def test_score_is_logit_zero_at_the_last_token(model_folder: Path) -> None:
    model, tokenizer = load_reward_model(model_folder)
    ids = tokenizer("12+35=47" + tokenizer.eos_token, return_tensors="pt")
    with torch.no_grad():
        expected = model(**ids).logits[0, 0].item()
    assert LearnedReward(model_folder)(["12+35="], ["47"]) == pytest.approx([expected], abs=1e-6)


def test_adapter_folder_reproduces_the_unmerged_model(adapter_folder: tuple[Path, list[float]]) -> None:
    folder, expected = adapter_folder
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["base_model_name_or_path"]
    got = LearnedReward(folder)(PROMPTS, COMPLETIONS)
    assert max(abs(e - g) for e, g in zip(expected, got, strict=True)) <= 1e-5
    alone = [LearnedReward(folder)([p], [c])[0] for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert max(abs(a - g) for a, g in zip(alone, got, strict=True)) <= 1e-5


def test_adapter_with_a_missing_base_fails_clearly(adapter_folder: tuple[Path, list[float]], tmp_path: Path) -> None:
    folder, _ = adapter_folder
    with pytest.raises(RewardError, match="cannot be loaded"):
        LearnedReward(folder)(["1+1="], ["2"], base=str(tmp_path / "no-base"))


def test_learned_reward_inside_a_grpo_run(model_folder: Path, tmp_path: Path) -> None:
    functions = [{"name": f"learned:{model_folder}", "kwargs": {"batch_size": 8}}]
    threads = torch.get_num_threads()
    try:
        result = run_recipe(validate(tiny_raw(tmp_path, reward={"functions": functions},
                                              train={"steps": 1, "threads": 1})))
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    name = f"learned:{model_folder}".replace(":", ".").replace("/", ".")
    assert records[-1][f"rewards/{name}/mean"] is not None
