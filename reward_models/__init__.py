"""Reward plug-ins behind one small protocol.

A reward is any callable ``f(prompts, completions, **columns) -> list[float | None]`` returning one
score per completion (None = not applicable to that sample). ``columns`` are the dataset's extra
columns, one value per completion (the built-in task passes ``answer``). Name a reward in a recipe
by a built-in name (``exact_answer``) or an import path (``my_pkg.scores:score``); see
``reward_models.registry``.
"""

from reward_models.protocol import RewardFn
from reward_models.registry import BUILTIN_REWARDS, resolve_reward

__all__ = ["BUILTIN_REWARDS", "RewardFn", "resolve_reward"]
