"""Reward plug-ins behind one small protocol.

A reward is any callable ``f(prompts, completions, **columns) -> list[float | None]`` returning one
score per completion (None = not applicable to that sample). ``columns`` are the dataset's extra
columns, one value per completion (the built-in task passes ``answer``). The built-in rewards are
``exact_answer``, ``format`` and ``length_penalty`` (``BUILTIN_REWARDS``), and ``learned:<folder>``
scores with a reward model (reward_models/learned.py).

This package depends on nothing of rl_lora (reward_models/protocol.py); the library finds a reward by
the name a recipe gives it, checks its scores and hands it to the trainers (rl_lora/tasks/rewards.py,
docs/rewards.md).
"""

from collections.abc import Callable

from reward_models.exact_answer import exact_answer
from reward_models.protocol import RewardError, RewardFn
from reward_models.shaping import answer_format, length_penalty

BUILTIN_REWARDS: dict[str, Callable] = {
    "exact_answer": exact_answer,
    "format": answer_format,
    "length_penalty": length_penalty,
}

__all__ = ["BUILTIN_REWARDS", "RewardError", "RewardFn"]
