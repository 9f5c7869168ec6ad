"""Preference data: files checked row by row before any model loads, and the built-in pairs.

Each malformed-file error must name the file, the row (counted from 1; for JSONL the line) and the
field, so a user can open the file at the right place.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rl_lora.config.schema import DataSpec, validate
from rl_lora.data import preferences
from rl_lora.data.preferences import read_preference_file, split_rows
from rl_lora.launch.runner import prepare_run
from rl_lora.models.loading import load_policy
from rl_lora.tasks.arithmetic import pairs as arithmetic_pairs
from rl_lora.tasks.arithmetic.model import builtin_path
from rl_lora.tasks.arithmetic.pairs import pairs_from_samples
from rl_lora.tasks.arithmetic.problems import Problem
from rl_lora.utils.errors import DataError
from tests_support import tiny_raw

GOOD = {"prompt": "12+35=", "chosen": "47", "rejected": "46"}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"prompt": "1+1=", "chosen": "2"}, "row 3: field 'rejected' is missing"),
        ({"prompt": "1+1=", "chosen": "2", "rejected": None}, "row 3: field 'rejected' is missing"),
        ({"prompt": "1+1=", "chosen": "2", "rejected": ""}, "row 3: field 'rejected' is empty"),
        ({"prompt": "1+1=", "chosen": "  ", "rejected": "3"}, "row 3: field 'chosen' is empty"),
        ({"prompt": "", "chosen": "2", "rejected": "3"}, "row 3: field 'prompt' is empty"),
        ({"prompt": "1+1=", "chosen": "2", "rejected": "2"}, "row 3: fields 'chosen' and 'rejected' are identical"),
        ({"prompt": "1+1=", "chosen": 2, "rejected": "3"}, "row 3: field 'chosen' must be a string or a list"),
        ('{"prompt": "1+1=", "chosen": "2", "rejected": ', "row 3: not valid JSON"),
        ('["1+1=", "2", "3"]', "row 3: expected an object with 'chosen' and 'rejected', got list"),
        ({"chosen": "1+1=2", "rejected": "1+1=3"}, "row 3: field 'prompt' is missing"),
    ],
)
def test_malformed_rows_name_file_row_and_field(tmp_path: Path, bad_row: object, message: str) -> None:
    path = _jsonl(tmp_path / "prefs.jsonl", [GOOD, GOOD, bad_row, GOOD])
    with pytest.raises(DataError) as err:
        read_preference_file(path)
    assert f"dataset '{path}' {message}" in str(err.value)


def test_row_numbers_are_line_numbers_in_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "rejected": ""}) + "\n")
    with pytest.raises(DataError, match="row 3: field 'rejected' is empty"):
        read_preference_file(path)


def test_conversational_rows(tmp_path: Path) -> None:
    def msgs(role: str, text: str) -> list[dict]:
        return [{"role": role, "content": text}]

    row = {"prompt": msgs("user", "12+35?"), "chosen": msgs("assistant", "47"), "rejected": msgs("assistant", "46")}
    path = _jsonl(tmp_path / "chat.jsonl", [row])
    assert read_preference_file(path) == [row]
    empty = {**row, "rejected": msgs("assistant", "")}
    with pytest.raises(DataError, match="row 2: field 'rejected': message 1 has an empty or missing 'content'"):
        read_preference_file(_jsonl(tmp_path / "c2.jsonl", [row, empty]))
    mixed = {**row, "chosen": "47"}
    with pytest.raises(DataError, match="row 1: mixes plain-text and conversational fields"):
        read_preference_file(_jsonl(tmp_path / "c3.jsonl", [mixed]))
    with pytest.raises(DataError, match="row 2: is plain text but earlier rows are conversational"):
        read_preference_file(_jsonl(tmp_path / "c4.jsonl", [row, GOOD]))


def test_implicit_prompt_rows_and_extra_columns(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"chosen": "1+1=2", "rejected": "1+1=3", "id": 7}])
    assert read_preference_file(path) == [{"chosen": "1+1=2", "rejected": "1+1=3"}]


def test_json_and_parquet_files(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "p.json").write_text(json.dumps([GOOD, {**GOOD, "chosen": "46"}]))
    with pytest.raises(DataError, match=r"p.json' row 2: fields 'chosen' and 'rejected' are identical"):
        read_preference_file(tmp_path / "p.json")
    pq.write_table(pa.Table.from_pylist([GOOD, {**GOOD, "rejected": ""}]), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p.parquet' row 2: field 'rejected' is empty"):
        read_preference_file(tmp_path / "p.parquet")
    (tmp_path / "obj.json").write_text(json.dumps({"rows": [GOOD]}))
    with pytest.raises(DataError, match="expected a JSON list of rows"):
        read_preference_file(tmp_path / "obj.json")


def test_missing_empty_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_preference_file(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        read_preference_file(tmp_path / "empty.jsonl")
    (tmp_path / "p.tsv").write_text("a\tb\n")
    with pytest.raises(DataError, match="unsupported file type '.tsv'"):
        read_preference_file(tmp_path / "p.tsv")


def test_bad_file_fails_before_any_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _jsonl(tmp_path / "prefs.jsonl", [GOOD] * 11 + [{**GOOD, "rejected": ""}])

    def no_model(*_: object, **__: object) -> None:
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr("rl_lora.algorithms.dpo.load_policy", no_model)
    monkeypatch.setattr("rl_lora.algorithms.reward_model.load_policy", no_model)
    for algorithm in ("dpo", "reward"):
        raw = tiny_raw(tmp_path / "runs", data={"preferences": str(path)})
        raw = {k: v for k, v in raw.items() if k not in ("grpo", "reward")} | {"algorithm": algorithm}
        with pytest.raises(DataError, match=r"prefs.jsonl' row 12: field 'rejected' is empty"):
            prepare_run(validate(raw))
    assert not (tmp_path / "runs").exists(), "no run folder for a run that never started"


def test_split_rows_is_seeded_and_disjoint() -> None:
    rows = [{"chosen": str(i), "rejected": "x"} for i in range(50)]
    train, held = split_rows(rows, 0.1, seed=3)
    assert len(held) == 5 and len(train) == 45
    assert not {r["chosen"] for r in train} & {r["chosen"] for r in held}
    assert split_rows(rows, 0.1, seed=3) == (train, held)


def test_pairs_keep_the_policys_own_wrong_answers() -> None:
    problems = [Problem("1+1=", "2"), Problem("2+2=", "4"), Problem("3+3=", "6")]
    samples = [["2", "3\nxx"], ["4", "4"], ["", " 7 "]]
    assert pairs_from_samples(problems, samples) == [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},  # its first line, as the reward reads it
        {"prompt": "3+3=", "chosen": "6", "rejected": "7"},  # an empty sample is no usable rejection
    ]


def test_builtin_pairs_are_sampled_deterministically_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    data = DataSpec(max_operand=25, eval_size=20)
    model, tokenizer, source = load_policy(validate({"model": {"warmup_steps": 0}}).model, data, progress=False)
    state = torch.random.get_rng_state()
    train, held = arithmetic_pairs.builtin_pairs(None, model, tokenizer, data)
    assert torch.equal(torch.random.get_rng_state(), state), "sampling must not move the global RNG"
    assert train and held and all(p["chosen"] != p["rejected"] and p["rejected"] for p in train + held)
    assert arithmetic_pairs.builtin_pairs(None, model, tokenizer, data) == (train, held)  # same seed, same pairs
    cache = Path(source)
    assert arithmetic_pairs.builtin_pairs(cache, model, tokenizer, data) == (train, held)

    def no_sampling(*_: object, **__: object) -> None:
        raise AssertionError("cached pairs were sampled again")

    monkeypatch.setattr(arithmetic_pairs, "sample_completions", no_sampling)
    assert arithmetic_pairs.builtin_pairs(cache, model, tokenizer, data) == (train, held)
    assert cache == builtin_path("arithmetic-tiny", 0, data)


def test_sections_of_other_algorithms_are_refused() -> None:
    from rl_lora.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="'dpo' is read by algorithm dpo, not grpo"):
        validate({"dpo": {"beta": 0.5}})
    with pytest.raises(ConfigError, match="'grpo' is read by algorithm grpo, not reward"):
        validate({"algorithm": "reward", "grpo": {"num_generations": 4}})
    with pytest.raises(ConfigError, match="'data.preferences' is read by algorithm dpo or reward, not grpo"):
        validate({"data": {"preferences": "prefs.jsonl"}})
    with pytest.raises(ConfigError, match="dpo.loss_weights has 1 entries for 2 dpo.loss_type entries"):
        validate({"algorithm": "dpo", "dpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}})
    with pytest.raises(ConfigError, match="data.eval_preferences needs data.preferences to name a file"):
        validate({"algorithm": "reward", "data": {"eval_preferences": "held.jsonl"}})
    assert validate({"algorithm": "dpo", "dpo": {"loss_type": "ipo"}}).dpo.loss_type == ["ipo"]


def test_conversational_pairs_need_a_chat_template() -> None:
    from rl_lora.algorithms.preference_data import check_chat_template
    from rl_lora.tasks.arithmetic.tokenizer import build_char_tokenizer

    rows = [{"chosen": [{"role": "assistant", "content": "2"}], "rejected": [{"role": "assistant", "content": "3"}]}]
    with pytest.raises(DataError, match="dataset 'chat.jsonl' is conversational .* has no chat template"):
        check_chat_template(rows, build_char_tokenizer(), "builtin", "chat.jsonl")
    check_chat_template([GOOD], build_char_tokenizer(), "builtin", "prefs.jsonl")  # plain text needs none


def test_preference_pairs_load_from_csv_and_save_to_disk_folders_in_every_trl_format(tmp_path: Path) -> None:
    import pandas as pd
    from datasets import Dataset, DatasetDict

    def turn(a: int, answer: str) -> list[dict]:
        return [{"role": "user", "content": f"{a}+{a}="}, {"role": "assistant", "content": answer}]

    implicit_chat = [{"chosen": turn(a, str(2 * a)), "rejected": turn(a, "0")} for a in range(10, 14)]
    folder = tmp_path / "prefs"
    DatasetDict({"train": Dataset.from_list(implicit_chat)}).save_to_disk(folder)
    rows = read_preference_file(folder, split="train")
    assert rows == implicit_chat and preferences.is_conversational(rows)
    pd.DataFrame([GOOD, {**GOOD, "chosen": "48"}]).to_csv(tmp_path / "p.csv", index=False)
    assert read_preference_file(tmp_path / "p.csv")[1] == {**GOOD, "chosen": "48"}
    with pytest.raises(DataError, match="has no split 'test'"):
        read_preference_file(folder, split="test")
