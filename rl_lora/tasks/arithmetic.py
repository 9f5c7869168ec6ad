"""The built-in task: two-operand addition, ``"a+b="`` -> ``"c"``, judged by exact answer.

Every pair (a, b) with both operands in [min_operand, max_operand] is a problem; a fixed, seeded
subset is held out for evaluation and never trained on (neither by the warm-up nor by RL).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from datasets import Dataset

from reward_models.exact_answer import extract_answer
from rl_lora.config import DataSpec
from rl_lora.errors import DataError

__all__ = ["Problem", "answer_tokens", "extract_answer", "split", "to_dataset"]


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


def _all_problems(spec: DataSpec) -> list[Problem]:
    lo, hi = spec.min_operand, spec.max_operand
    if lo > hi:
        raise DataError(f"data.min_operand ({lo}) is larger than data.max_operand ({hi})")
    return [Problem(f"{a}+{b}=", str(a + b)) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]


def split(spec: DataSpec) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) problems; the held-out set depends only on the range and split_seed."""
    problems = _all_problems(spec)
    if spec.eval_size >= len(problems):
        raise DataError(
            f"data.eval_size ({spec.eval_size}) leaves no training problems: the operand range "
            f"[{spec.min_operand}, {spec.max_operand}] has only {len(problems)} problems"
        )
    order = list(range(len(problems)))
    random.Random(spec.split_seed).shuffle(order)
    held = set(order[: spec.eval_size])
    train = [p for i, p in enumerate(problems) if i not in held]
    evaluation = [problems[i] for i in order[: spec.eval_size]]
    return train, evaluation


def answer_tokens(spec: DataSpec) -> int:
    """Tokens a complete answer needs with the character tokenizer: the largest sum's digits + EOS."""
    return len(str(2 * spec.max_operand)) + 1


def to_dataset(problems: list[Problem]) -> Dataset:
    """A datasets.Dataset with a ``prompt`` column and an ``answer`` column (passed to rewards)."""
    return Dataset.from_dict(
        {"prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems]}
    )


