"""Tasks as plug-ins: the dataset task's formats and evaluation, a user's own task, and the boundary that
keeps the built-in arithmetic task one task among many."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from rl_lora.config.schema import validate
from rl_lora.data.sources import read_rows
from rl_lora.launch.runner import run_recipe
from rl_lora.tasks.arithmetic.tokenizer import build_char_tokenizer
from rl_lora.tasks.dataset import DatasetTask, validate_prompt_rows
from rl_lora.tasks.registry import make_task
from rl_lora.utils.errors import ConfigError, DataError, RewardError
from tests_support import save_tiny_chat_model, tiny_raw

REPO = Path(__file__).resolve().parents[1]
ROWS = [{"prompt": f"{a}+{a}=", "answer": str(2 * a), "level": a % 3} for a in range(10, 40)]
CHAT = [{**r, "prompt": [{"role": "system", "content": "Add."}, {"role": "user", "content": r["prompt"]}]}
        for r in ROWS]
SCORING = '''
def exact_match(prompts, completions, answer, **_):
    return [float(c.split("\\n")[0].strip() == a) for c, a in zip(completions, answer)]


def digits(prompts, completions, answer, **_):
    return [sum(x == y for x, y in zip(c, a)) / len(a) for c, a in zip(completions, answer)]


def needs_level(prompts, completions, level, **_):
    return [float(x) for x in level]


def needs_missing(prompts, completions, difficulty, **_):
    return [0.0] * len(completions)
'''


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _scoring(tmp: Path) -> str:
    (tmp / "scoring.py").write_text(SCORING)
    return str(tmp / "scoring.py")


def _dataset_raw(tmp: Path, source: Path, **data: object) -> dict:
    scoring = _scoring(tmp)
    raw = tiny_raw(tmp / "runs", reward={"functions": [{"name": f"{scoring}:digits"}]})
    raw["data"] = {"task": "dataset", "source": str(source), "eval_fraction": 0.2,
                   "metrics": [{"name": f"{scoring}:exact_match"}], **data}
    return raw


def _chat_tokenizer():  # the built-in character tokenizer with a minimal chat template
    tok = build_char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}a:{% endif %}")
    return tok


# -- formats -----------------------------------------------------------------------------------
def _write_all_formats(tmp: Path) -> dict[str, Path]:
    import pandas as pd
    from datasets import Dataset, DatasetDict

    paths = {"jsonl": _jsonl(tmp / "d.jsonl", ROWS)}
    paths["json"] = tmp / "d.json"
    paths["json"].write_text(json.dumps(ROWS))
    paths["parquet"] = tmp / "d.parquet"
    pd.DataFrame(ROWS).to_parquet(paths["parquet"])
    paths["csv"] = tmp / "d.csv"
    pd.DataFrame(ROWS).to_csv(paths["csv"], index=False)
    paths["disk"] = tmp / "disk"
    Dataset.from_list(ROWS).save_to_disk(str(paths["disk"]))
    paths["disk-dict"] = tmp / "disk-dict"
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:5])}).save_to_disk(
        str(paths["disk-dict"]))
    return paths


def test_every_format_loads_the_same_prompts(tmp_path: Path) -> None:
    for kind, path in _write_all_formats(tmp_path).items():
        rows = validate_prompt_rows(read_rows(path), str(path))
        assert [r["prompt"] for r in rows.rows] == [r["prompt"] for r in ROWS], kind
        assert rows.columns == ["prompt", "answer", "level"], kind
        answers = [str(r["answer"]) for r in rows.rows]  # CSV reads every cell as a string
        assert answers == [r["answer"] for r in ROWS], kind
    assert len(read_rows(tmp_path / "disk-dict", split="test")) == 5
    with pytest.raises(DataError, match="has no split 'validation' \\(splits: train, test; set data.split\\)"):
        read_rows(tmp_path / "disk-dict", split="validation")


def test_conversational_prompts_render_through_the_chat_template(tmp_path: Path) -> None:
    raw = _dataset_raw(tmp_path, _jsonl(tmp_path / "chat.jsonl", CHAT))
    with pytest.raises(DataError, match="has no chat template: use a chat/instruct model"):  # before any weights
        make_task(validate(raw)).check()
    raw["model"] = {"policy": str(save_tiny_chat_model(tmp_path / "chat-model"))}
    task = make_task(validate(raw))
    assert task.check() == {"train_prompts": 24, "held_out_prompts": 6}
    data = task.train_dataset(_chat_tokenizer())
    assert data.column_names == ["prompt", "answer", "level"]
    assert all(p.startswith("s:Add.\nu:") and p.endswith("=\na:") for p in data["prompt"])
    with pytest.raises(DataError, match="is conversational .* has no chat template: use a chat/instruct model"):
        task.train_dataset(build_char_tokenizer())


def test_string_prompts_as_chat_and_a_renamed_prompt_column(tmp_path: Path) -> None:
    rows = [{"question": r["prompt"], "answer": r["answer"]} for r in ROWS]
    raw = _dataset_raw(tmp_path, _jsonl(tmp_path / "q.jsonl", rows), prompt_column="question", chat_prompts=True)
    raw["model"] = {"policy": str(save_tiny_chat_model(tmp_path / "chat-model"))}
    task = make_task(validate(raw))
    task.check()
    data = task.train_dataset(_chat_tokenizer())
    assert data.column_names == ["prompt", "answer"] and data["prompt"][0].startswith("u:")


def test_held_out_rows_are_never_trained_on_and_capped(tmp_path: Path) -> None:
    raw = _dataset_raw(tmp_path, _jsonl(tmp_path / "d.jsonl", ROWS), eval_size=4)
    task = make_task(validate(raw))
    assert task.check() == {"train_prompts": 24, "held_out_prompts": 4}
    train = set(task.train_dataset(build_char_tokenizer())["prompt"])
    assert not train & {r["prompt"] for r in task._held.rows}
    again = make_task(validate(raw))
    again.check()
    assert again._held.rows == task._held.rows  # data.split_seed fixes the split
    held = _jsonl(tmp_path / "held.jsonl", ROWS[:3])
    other = make_task(validate(_dataset_raw(tmp_path, tmp_path / "d.jsonl", eval_source=str(held))))
    assert other.check() == {"train_prompts": 30, "held_out_prompts": 3}


def test_evaluation_scores_greedy_completions_with_rewards_and_metrics(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rl_lora.tasks.evaluation
    from rl_lora.models.loading import load_policy

    raw = _dataset_raw(tmp_path, _jsonl(tmp_path / "d.jsonl", ROWS))
    raw["reward"]["functions"][0]["weight"] = 0.5
    config = validate(raw)
    task = make_task(config)
    task.check()
    model, tokenizer, _ = load_policy(config.model, config.data, progress=False)
    figures = task.evaluate(model, tokenizer, 4)
    assert set(figures) == {"exact_match", "held_out_reward", "held_out_reward/digits"}
    assert task.metric.name == "exact_match" and task.metric.higher_is_better
    assert all(0.0 <= v <= 1.0 for v in figures.values())
    # Completions chosen here, so each figure is a number worked out by hand: the metric and the reward each
    # score their own held-out row's answer, and the reward's weight is applied.
    answers = [r["answer"] for r in task._held.rows]
    assert len(answers) == 6 and all(len(a) == 2 for a in answers)
    given = [answers[0], answers[1] + "\nx", answers[2][0], "", "", "x"]  # right, right first line, 1 of 2 digits
    monkeypatch.setattr(rl_lora.tasks.evaluation, "greedy_completions",
                        lambda model, tokenizer, prompts, tokens: given if prompts == task._rendered else None)
    figures = task.evaluate(model, tokenizer, 4)
    assert figures["exact_match"] == pytest.approx(2 / 6)
    assert figures["held_out_reward/digits"] == pytest.approx(2.5 / 6)
    assert figures["held_out_reward"] == pytest.approx(0.5 * 2.5 / 6)


def test_a_reward_needing_a_missing_column_is_refused_before_training(tmp_path: Path) -> None:
    raw = _dataset_raw(tmp_path, _jsonl(tmp_path / "d.jsonl", ROWS))
    scoring = tmp_path / "scoring.py"
    raw["reward"]["functions"] = [{"name": f"{scoring}:needs_missing"}]
    with pytest.raises(RewardError, match=f"reward '{scoring}:needs_missing' needs column 'difficulty', which "
                                          f"dataset '.*d.jsonl' does not have \\(its columns: answer, level\\)"):
        run_recipe(validate(raw))
    raw["reward"]["functions"] = [{"name": f"{scoring}:needs_level"}]  # an existing column is fine
    make_task(validate(raw)).check()


# -- a user's own task -------------------------------------------------------------------------
OWN_TASK = '''
from datasets import Dataset
from rl_lora.tasks.base import Metric


class Echo:
    """Train on "x=" prompts; judged by the mean completion length (lower is better)."""

    metric = Metric("length", higher_is_better=False, description="mean completion length")

    def __init__(self, n):
        self.prompts = [f"{i}=" for i in range(n)]

    def train_dataset(self, tokenizer):
        return Dataset.from_dict({"prompt": self.prompts})

    def evaluate(self, model, tokenizer, max_new_tokens):
        from rl_lora.tasks.evaluation import greedy_completions

        out = greedy_completions(model, tokenizer, self.prompts[:8], max_new_tokens or 4)
        return {"length": sum(map(len, out)) / len(out)}


def make(config, n=16):
    return Echo(n)


def not_a_task(config):
    return object()
'''


def test_a_task_plug_in_from_a_file_runs_and_is_judged_by_its_own_metric(tmp_path: Path) -> None:
    (tmp_path / "own.py").write_text(OWN_TASK)
    raw = tiny_raw(tmp_path / "runs", data={"task": f"{tmp_path / 'own.py'}:make", "task_kwargs": {"n": 12}})
    raw["data"].pop("eval_size")
    result = run_recipe(validate(raw))
    s = result.summary
    assert s["headline_metric"] == "length" and s["higher_is_better"] is False
    assert {"start_length", "final_length", "best_length", "best_length_step"} <= set(s)
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "eval/length" in records[0]
    raw["data"] = {"task": f"{tmp_path / 'own.py'}:not_a_task"}
    with pytest.raises(ConfigError, match="has no metric, train_dataset, evaluate"):
        make_task(validate(raw))
    raw["data"]["task_kwargs"] = {"m": 1}
    raw["data"]["task"] = f"{tmp_path / 'own.py'}:make"
    with pytest.raises(ConfigError, match="cannot be called as factory\\(config, \\*\\*data.task_kwargs\\)"):
        make_task(validate(raw))
    raw["data"]["task"] = "arithmetc"
    raw["data"]["task_kwargs"] = {}
    with pytest.raises(ConfigError, match="unknown task 'arithmetc'; did you mean 'arithmetic'"):
        make_task(validate(raw))


def test_no_library_module_outside_the_arithmetic_task_imports_it() -> None:
    """The arithmetic task, its model and its weights are rl_lora/tasks/arithmetic/; everything else reaches them
    only by name (the task registry's and the policy resolver's plug-in tables), never by import."""
    offenders = []
    for path in [*REPO.glob("rl_lora/**/*.py"), *REPO.glob("reward_models/**/*.py")]:
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("rl_lora/tasks/arithmetic/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            if any(n.startswith("rl_lora.tasks.arithmetic") for n in names):
                offenders.append(rel)
    assert not offenders, offenders


def test_the_dataset_tasks_own_keys_are_refused_elsewhere() -> None:
    with pytest.raises(ConfigError, match="data.source is read by data.task: dataset, not 'arithmetic'"):
        validate({"data": {"source": "x.jsonl"}})
    with pytest.raises(ConfigError, match="data.task dataset needs data.source"):
        validate({"data": {"task": "dataset"}})
    with pytest.raises(ConfigError, match="data.min_operand is read by data.task: arithmetic, not 'dataset'"):
        validate({"data": {"task": "dataset", "source": "x.jsonl", "min_operand": 3}})
    with pytest.raises(ConfigError, match="data.eval_source and data.eval_split both"):
        validate({"data": {"task": "dataset", "source": "x.jsonl", "eval_source": "y.jsonl", "eval_split": "test"}})
    assert isinstance(make_task(validate({"data": {"task": "dataset", "source": "x.jsonl"}})), DatasetTask)


def test_two_rewards_with_one_name_are_held_out_under_two_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``a.py:score`` and ``b.py:score`` are both 'score': numbered in the recipe's order, with a warning that
    says which is which, so neither's held-out figure overwrites the other's."""
    import rl_lora.tasks.evaluation

    (tmp_path / "a.py").write_text("def score(prompts, completions, **_):\n    return [1.0] * len(completions)\n")
    (tmp_path / "b.py").write_text("def score(prompts, completions, **_):\n    return [0.25] * len(completions)\n")
    raw = _dataset_raw(tmp_path, _jsonl(tmp_path / "d.jsonl", ROWS))
    raw["reward"]["functions"] = [{"name": f"{tmp_path / 'a.py'}:score"}, {"name": f"{tmp_path / 'b.py'}:score"}]
    task = make_task(validate(raw))
    with pytest.warns(UserWarning, match=r"2 rewards are named 'score'; held out as: '.*a.py:score' as "
                                         r"held_out_reward/score_1, '.*b.py:score' as held_out_reward/score_2"):
        task.check()
    monkeypatch.setattr(rl_lora.tasks.evaluation, "greedy_completions",
                        lambda model, tokenizer, prompts, tokens: ["1"] * len(prompts))
    figures = task.evaluate(None, None, 4)
    assert figures["held_out_reward/score_1"] == 1.0 and figures["held_out_reward/score_2"] == 0.25
    assert "held_out_reward/score" not in figures and figures["held_out_reward"] == 1.25
