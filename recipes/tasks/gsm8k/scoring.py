"""Reward and metric for GSM8K-style data: the reference ``answer`` column ends in ``#### <number>``.

A completion is right when the last number it writes equals that number (thousands separators ignored),
so "... so she has 18 apples. #### 18" and "The answer is 18." both count.
"""

from __future__ import annotations

import re
from typing import Any

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def reference(answer: str) -> str:
    """The number after the last ``####`` of a GSM8K answer."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def last_number(completion: str) -> str:
    found = _NUMBER.findall(completion)
    return found[-1].replace(",", "").rstrip(".") if found else ""


def correct(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """1.0 when the completion's last number is the reference answer, else 0.0."""
    return [float(last_number(c) == reference(a)) for c, a in zip(completions, answer, strict=True)]
