"""Exact-answer reward: 1.0 when the completion's answer equals the reference answer, else 0.0.

Where the answer sits in a completion depends on how the model was asked (rl_lora/tasks/arithmetic/task.py):

- ``first_line`` (plain prompts, ``"12+35="``): the completion's first line, stripped of spaces;
- ``last_integer`` (chat prompts, "What is 12+35? Answer with the number only."): the last integer in
  the completion, so "47", "The answer is 47." and "12 + 35 = 47" all read 47.

The task's dataset says which rule applies through an ``answer_rule`` column; without one (the plain
task, or a user's data set), the rule is ``first_line``.
"""

from __future__ import annotations

import re
from typing import Any

FIRST_LINE = "first_line"
LAST_INTEGER = "last_integer"
ANSWER_RULES = (FIRST_LINE, LAST_INTEGER)
_INTEGER = re.compile(r"-?\d+")


def extract_answer(completion: str, rule: str = FIRST_LINE) -> str:
    """The completion's answer under ``rule`` (see the module docstring); "" when there is none."""
    if rule == FIRST_LINE:
        return completion.split("\n", 1)[0].strip()
    if rule == LAST_INTEGER:
        found = _INTEGER.findall(completion)
        return found[-1] if found else ""
    raise ValueError(f"unknown answer rule {rule!r} (known: {', '.join(ANSWER_RULES)})")


def exact_answer(
    prompts: list[str], completions: list[str], answer: list[str], answer_rule: list[str] | str | None = None, **_: Any
) -> list[float]:
    """1.0 for an exact match of the extracted answer, 0.0 otherwise (the built-in task's reward).

    ``answer_rule``: one rule per completion (the dataset column), one rule for all, or None for
    ``first_line``.
    """
    if answer_rule is None or isinstance(answer_rule, str):
        rules = [answer_rule or FIRST_LINE] * len(completions)
    else:
        rules = list(answer_rule)
    return [
        float(extract_answer(c, rule) == str(a).strip())
        for c, a, rule in zip(completions, answer, rules, strict=True)
    ]
