"""Adapting plug-ins to the trainers: TRL's reward signature (GRPO) and the project's PPO use the same
wrapper, which checks every score and reports a plug-in's failure as the plug-in's, with the step."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from reward_models.protocol import check_scores
from reward_models.registry import resolve_reward
from rl_lora.errors import RewardError


def trl_reward(name: str, fn: Callable, kwargs: dict[str, Any]) -> Callable:
    """Adapt a plug-in to TRL's reward signature, checking every score it returns."""

    @functools.wraps(fn)
    def reward(prompts: list[str], completions: list[str], completion_ids: Any = None, **columns: Any) -> list:
        state = columns.pop("trainer_state", None)
        columns.pop("log_extra", None)
        columns.pop("log_metric", None)
        step = getattr(state, "global_step", None)
        try:
            scores = fn(prompts, completions, **columns, **kwargs)
        except Exception as exc:  # a plug-in's failure, reported as the plug-in's, with the step
            raise RewardError(
                f"reward '{name}' raised at step {step} on a batch of {len(completions)} completions "
                f"(first prompt {prompts[0]!r}): {type(exc).__name__}: {exc}"
            ) from exc
        return check_scores(name, scores, len(completions), step=step)

    reward.__name__ = name.replace(":", ".").replace("/", ".")
    return reward


def trainer_rewards(functions: list[Any]) -> list[Callable]:
    """The recipe's ``reward.functions`` specs as checked trainer reward functions, in order."""
    return [trl_reward(f.name, resolve_reward(f.name), f.kwargs) for f in functions]
