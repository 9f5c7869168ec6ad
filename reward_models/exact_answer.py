"""Exact-answer reward: 1.0 when the completion's answer equals the reference answer, else 0.0."""

from __future__ import annotations

from typing import Any


def extract_answer(completion: str) -> str:
    """The completion's answer: its first line, stripped of surrounding spaces."""
    return completion.split("\n", 1)[0].strip()


def exact_answer(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """1.0 for an exact match of the extracted answer, 0.0 otherwise (the built-in task's reward)."""
    return [float(extract_answer(c) == str(a).strip()) for c, a in zip(completions, answer, strict=True)]
