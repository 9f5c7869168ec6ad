"""Shaping rewards that need no reference answer: answer format and completion length.

Both are meant to be mixed with a correctness reward through ``reward.functions`` weights, e.g.
``[{name: exact_answer, weight: 1.0}, {name: format, weight: 0.1}]``.
"""

from __future__ import annotations

import re
from typing import Any

from reward_models.exact_answer import extract_answer

# An integer: digits with an optional leading minus sign, nothing else ("-12", "47"; not "4 7", "+3", "1.5").
_INTEGER = re.compile(r"-?\d+")


def answer_format(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1.0 when the completion's first line (surrounding spaces stripped) is an integer, else 0.0.

    The same first-line rule as ``exact_answer``, so a well-formatted wrong answer scores 1.0 here and
    0.0 there: the format term rewards answering in the expected shape, not answering right.
    """
    return [float(_INTEGER.fullmatch(extract_answer(c)) is not None) for c in completions]


def length_penalty(prompts: list[str], completions: list[str], max_chars: int = 100, **_: Any) -> list[float]:
    """``-len(completion) / max_chars``: 0 for an empty completion, -1 at ``max_chars`` characters.

    Not clipped: a completion longer than ``max_chars`` scores below -1, so the pull towards short
    answers keeps acting past the limit.
    """
    if not isinstance(max_chars, int) or isinstance(max_chars, bool) or max_chars < 1:
        raise ValueError(f"max_chars must be an integer >= 1, got {max_chars!r}")
    return [-len(c) / max_chars for c in completions]
