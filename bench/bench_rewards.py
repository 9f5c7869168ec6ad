"""The benchmark's reward, importable by name (``bench_rewards:spread``) from the worker processes."""

from __future__ import annotations


def spread(prompts: list[str], completions: list[str], **_: object) -> list[float]:
    """Spread within every group, so advantages and gradients are non-zero in each step."""
    return [c.count("1") / max(len(c), 1) + 0.01 * len(c) for c in completions]
