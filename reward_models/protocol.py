"""The reward protocol every plug-in follows, and the checks applied to what a plug-in returns."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

from rl_lora.errors import RewardError


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> Sequence[float | None]:
        """One score per completion; None where the reward does not apply."""
        ...


def check_scores(name: str, scores: Any, expected: int, step: int | None = None) -> list[float | None]:
    """Return ``scores`` as a list, or raise RewardError naming the reward, the step and the sample."""
    at = f" at step {step}" if step is not None else ""
    if isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence):
        try:
            scores = list(scores)
        except TypeError:
            raise RewardError(
                f"reward '{name}'{at} returned {type(scores).__name__}, expected a list of {expected} scores"
            ) from None
    if len(scores) != expected:
        raise RewardError(
            f"reward '{name}'{at} returned {len(scores)} scores for {expected} completions "
            "(one score per completion is required; nothing is broadcast)"
        )
    out: list[float | None] = []
    for i, s in enumerate(scores):
        if s is None:
            out.append(None)
            continue
        try:
            value = float(s)
        except (TypeError, ValueError):
            raise RewardError(f"reward '{name}'{at} sample {i}: score {s!r} is not a number") from None
        if not math.isfinite(value):
            raise RewardError(f"reward '{name}'{at} sample {i}: score is {value} (not finite)")
        out.append(value)
    if expected and all(v is None for v in out):
        raise RewardError(f"reward '{name}'{at} returned None for every one of {expected} completions")
    return out
