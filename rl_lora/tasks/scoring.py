"""Scoring held-out completions with functions of the reward signature (rewards and metrics alike)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from rl_lora.config.schema import MetricSpec, RewardFunctionSpec
from rl_lora.tasks.rewards import check_columns, check_keywords, check_scores, resolve_reward
from rl_lora.utils.errors import RewardError

# (prompts, completions, columns) -> one score (or None) per completion
Scorer = Callable[[list[str], list[str], dict[str, list[Any]]], list[float | None]]


def _scorer(what: str, name: str, kwargs: dict[str, Any], columns: list[str], dataset: str) -> Scorer:
    fn = resolve_reward(name)
    check_keywords(name, fn, kwargs)
    check_columns(what, fn, kwargs, columns, dataset)

    def score(prompts: list[str], completions: list[str], data: dict[str, list[Any]]) -> list[float | None]:
        try:
            scores = fn(prompts, completions, **data, **kwargs)
        except Exception as exc:  # the plug-in's failure, named as the plug-in's
            raise RewardError(f"{what} raised on the held-out completions: {type(exc).__name__}: {exc}") from exc
        return check_scores(name, scores, len(completions))

    return score


def reward_scorer(spec: RewardFunctionSpec, columns: list[str], dataset: str) -> Scorer:
    return _scorer(f"reward '{spec.name}'", spec.name, spec.kwargs, columns, dataset)


def metric_scorer(spec: MetricSpec, columns: list[str], dataset: str) -> Scorer:
    return _scorer(f"metric '{spec.name}'", spec.name, spec.kwargs, columns, dataset)


def score_mean(scores: list[float | None]) -> float:
    """Mean over the completions a function scored (None: it does not apply); NaN when it scored none."""
    given = [s for s in scores if s is not None]
    return sum(given) / len(given) if given else math.nan
