"""Finding a reward by name: a built-in, or ``module.path:function``."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from reward_models.exact_answer import exact_answer
from rl_lora.errors import RewardError

BUILTIN_REWARDS: dict[str, Callable] = {"exact_answer": exact_answer}


def resolve_reward(name: str) -> Callable:
    """The callable a recipe's reward name refers to. Raises RewardError if it cannot be found."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    if ":" not in name:
        known = ", ".join(sorted(BUILTIN_REWARDS))
        raise RewardError(f"unknown reward '{name}': not a built-in ({known}) nor 'module.path:function'")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(f"reward '{name}': cannot import module '{module_name}' ({exc})") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise RewardError(f"reward '{name}': module '{module_name}' has no callable '{attr}'")
    return fn
