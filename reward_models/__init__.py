"""Reward plug-ins behind one small protocol.

A reward is any callable ``f(prompts, completions, **columns) -> list[float | None]`` returning one
score per completion (None = not applicable to that sample). ``columns`` are the dataset's extra
columns, one value per completion (the built-in task passes ``answer``). Name a reward in a recipe
by a built-in name (``exact_answer``, ``format``, ``length_penalty``), an import path
(``my_pkg.scores:score``), a file path (``path/to/my_reward.py:score``), an installed entry point
(group ``rl_lora.reward_models``) or a reward model (``learned:<folder>``); see
``reward_models.registry`` and docs/rewards.md.
"""

from reward_models.protocol import RewardFn
from reward_models.registry import BUILTIN_REWARDS, ENTRY_POINT_GROUP, check_reward, resolve_reward

__all__ = ["BUILTIN_REWARDS", "ENTRY_POINT_GROUP", "RewardFn", "check_reward", "resolve_reward"]
