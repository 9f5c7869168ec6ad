"""Rewards: the exact-answer reward on hand-made cases, score checks, and finding plug-ins."""

from __future__ import annotations

import math

import pytest

from reward_models.exact_answer import exact_answer, extract_answer
from rl_lora.tasks.rewards import check_scores, resolve_reward
from rl_lora.utils.errors import RewardError


@pytest.mark.parametrize(
    ("completion", "answer", "score"),
    [
        ("47", "47", 1.0),
        (" 47 ", "47", 1.0),  # surrounding spaces are not part of the answer
        ("47\n12+3", "47", 1.0),  # only the first line counts
        ("4 7", "47", 0.0),  # a space inside the number is a different answer
        ("470", "47", 0.0),
        ("", "47", 0.0),
        ("-3", "-3", 1.0),
    ],
)
def test_exact_answer_cases(completion: str, answer: str, score: float) -> None:
    assert exact_answer(["x"], [completion], answer=[answer]) == [score]


def test_extract_answer() -> None:
    assert extract_answer(" 12 \nrest") == "12"


def test_exact_answer_is_elementwise() -> None:
    assert exact_answer(["a", "b", "c"], ["1", "2", "3"], answer=["1", "0", "3"]) == [1.0, 0.0, 1.0]


def test_check_scores_accepts_none_and_numbers() -> None:
    assert check_scores("r", [1, None, 0.5], 3) == [1.0, None, 0.5]


def test_wrong_length_is_refused_not_broadcast() -> None:
    with pytest.raises(RewardError, match=r"reward 'r' at step 7 returned 2 scores for 3 completions"):
        check_scores("r", [1.0, 0.0], 3, step=7)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_names_the_sample(bad: float) -> None:
    with pytest.raises(RewardError, match=r"reward 'r' sample 1: score is"):
        check_scores("r", [0.0, bad], 2)


def test_all_none_and_non_numbers() -> None:
    with pytest.raises(RewardError, match="None for every one of 2"):
        check_scores("r", [None, None], 2)
    with pytest.raises(RewardError, match="sample 0: score 'high' is not a number"):
        check_scores("r", ["high"], 1)
    with pytest.raises(RewardError, match="expected a list of 1 scores"):
        check_scores("r", 1.0, 1)


def test_resolve_builtin_and_import_path() -> None:
    assert resolve_reward("exact_answer") is exact_answer
    assert resolve_reward("reward_helpers:digit_ones").__name__ == "digit_ones"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("exact_anser", "unknown reward 'exact_anser'"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("reward_helpers:missing", "has no callable 'missing'"),
    ],
)
def test_resolve_errors(name: str, message: str) -> None:
    with pytest.raises(RewardError, match=message):
        resolve_reward(name)
