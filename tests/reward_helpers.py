"""Reward functions used by tests, importable as ``reward_helpers:NAME`` (tests/ is on sys.path)."""

from __future__ import annotations

from typing import Any


def digit_ones(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """Fraction of '1' characters: varies between samples even for an untrained model."""
    return [c.count("1") / max(len(c), 1) + 0.01 * len(c) for c in completions]


def raises(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    raise RuntimeError("scoring server unreachable")


def wrong_length(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    return [0.0] * (len(completions) - 1)
