"""The shipped dataset-task examples: their data is what their script makes, and the hub recipe's data path
(GSM8K's question/answer columns, chat prompts, "#### 72" answers, a test split) works on a local copy."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from rl_lora.config.schema import load_recipe, validate
from rl_lora.launch.runner import run_recipe
from tests_support import save_tiny_chat_model

REPO = Path(__file__).resolve().parents[1]
GSM8K_TRAIN = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 1,200 pens. 200 are sold. How many are left?",
     "answer": "1,200 - 200 = <<1200-200=1000>>1,000 pens are left.\n#### 1,000"},
] * 4
GSM8K_TEST = [{"question": "What is 5 times 6?", "answer": "5 * 6 = <<5*6=30>>30\n#### 30"}] * 3


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem + "_shipped", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_sums_data_is_what_its_script_makes() -> None:
    folder = REPO / "recipes" / "tasks" / "sums"
    problems = _module(folder / "make_data.py").problems()
    rows = [json.loads(x) for x in (folder / "sums.jsonl").read_text().splitlines()]
    chat = [json.loads(x) for x in (folder / "sums_chat.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["answer"]) for r in rows] == [(f"{e}=", a) for e, a in problems]
    assert len(rows) == len(chat) == 300 and len({r["prompt"] for r in rows}) == 300
    assert [c["prompt"][0]["content"].split()[2].rstrip("?") for c in chat] == [e for e, _ in problems]
    scoring = _module(folder / "scoring.py")
    assert scoring.exact_match([""] * 2, ["12", "12\nx"], ["12", "13"]) == [1.0, 0.0]
    assert scoring.closeness([""] * 3, ["12", "15", "x"], ["12", "12", "12"]) == [1.0, pytest.approx(0.7), 0.0]
    assert scoring.exact_match([""], ["3 + 4 + 5 = 12."], ["12"], rule="last_integer") == [1.0]


def test_every_shipped_recipe_and_pipeline_validates_offline() -> None:
    """Every YAML file under recipes/ (at any depth) is a recipe or a pipeline, and validates; loads nothing
    (no model, no data, no hub). Fails on an empty or moved recipes/ folder, not only on a bad file."""
    from rl_lora.config.schema import read_recipe_file
    from rl_lora.study.pipeline import is_pipeline, load_pipeline

    files = sorted((REPO / "recipes").rglob("*.yaml"))
    pipelines = [f for f in files if is_pipeline(read_recipe_file(f))]
    recipes = [f for f in files if f not in pipelines]
    algorithms = {load_recipe(f).algorithm for f in recipes}
    assert algorithms == {"grpo", "ppo", "dpo", "reward"}, f"shipped recipes cover {sorted(algorithms)}"
    assert [load_recipe(f).name for f in recipes] == [f.stem for f in recipes]  # a run folder is named after it
    assert pipelines, "no pipeline under recipes/"
    for pipeline in pipelines:
        stages = load_pipeline(pipeline).stages  # every stage with its overrides
        assert len(stages) >= 2 and all(stage.recipe in recipes for stage in stages), pipeline


def test_gsm8k_scoring_reads_the_number_after_the_marks() -> None:
    scoring = _module(REPO / "recipes" / "tasks" / "gsm8k" / "scoring.py")
    answers = [r["answer"] for r in GSM8K_TRAIN[:2]]
    assert scoring.correct(["", ""], ["So he has 7 apples.", "That leaves 1,000."], answers) == [1.0, 1.0]
    assert scoring.correct([""], ["#### 7000"], answers[1:]) == [0.0]


def test_the_gsm8k_recipe_runs_on_a_local_copy_in_the_same_format(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    copy = tmp_path / "gsm8k"
    DatasetDict({"train": Dataset.from_list(GSM8K_TRAIN), "test": Dataset.from_list(GSM8K_TEST)}).save_to_disk(copy)
    raw = load_recipe(REPO / "recipes" / "grpo_gsm8k_qwen.yaml").to_dict()
    raw["model"] = {"policy": str(save_tiny_chat_model(tmp_path / "model")), "dtype": "float32"}
    raw["data"].update(source=str(copy), subset=None)
    raw["grpo"]["max_completion_length"] = 8
    raw["train"].update(steps=2, batch_size=16, eval_every=1)
    raw["logging"].update(output_dir=str(tmp_path / "runs"), wandb=False, progress=False)
    summary = run_recipe(validate(raw)).summary
    assert summary["headline_metric"] == "accuracy"
    assert summary["train_prompts"] == 8 and summary["held_out_prompts"] == 3
    assert 0.0 <= summary["final_accuracy"] <= 1.0 and "final_held_out_reward/correct" in summary
