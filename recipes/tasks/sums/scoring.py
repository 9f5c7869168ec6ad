"""Reward and metric functions of the example dataset task (recipes/tasks/sums/).

Every function has the reward signature ``f(prompts, completions, **columns) -> scores``: the dataset's
``answer`` column arrives as the keyword ``answer`` (one per completion). ``rule`` says where the answer
sits in a completion: ``first_line`` for the built-in model's bare answers ("12"), ``last_integer`` for
instruct models that answer in a sentence ("3 + 4 + 5 = 12").
"""

from __future__ import annotations

import re
from typing import Any

_INTEGER = re.compile(r"-?\d+")


def read_answer(completion: str, rule: str = "first_line") -> str:
    if rule == "first_line":
        return completion.split("\n", 1)[0].strip()
    found = _INTEGER.findall(completion)
    return found[-1] if found else ""


def exact_match(prompts: list[str], completions: list[str], answer: list[str], rule: str = "first_line",
                **_: Any) -> list[float]:
    """1.0 when the completion's answer is exactly the reference answer, else 0.0 (the headline metric)."""
    return [float(read_answer(c, rule) == a) for c, a in zip(completions, answer, strict=True)]


def closeness(prompts: list[str], completions: list[str], answer: list[str], rule: str = "first_line",
              **_: Any) -> list[float]:
    """1.0 for the right sum, falling by 0.1 per unit off, 0.0 for no number: partial credit, so a policy that
    is never exactly right still sees which of its samples were nearer (a denser signal than exact match)."""
    scores = []
    for c, a in zip(completions, answer, strict=True):
        got = read_answer(c, rule)
        scores.append(max(0.0, 1.0 - abs(int(got) - int(a)) / 10) if _INTEGER.fullmatch(got) else 0.0)
    return scores
