"""The library's side of the reward contract: finding a reward by the name a recipe gives it, refusing
keywords and columns it would not get, checking every score it returns, and adapting it to the trainers.

The rewards themselves and their protocol live in ``reward_models/``, which imports nothing of rl_lora.
A name takes one of five forms, tried in this order:

- a built-in name: ``exact_answer``, ``format``, ``length_penalty`` (``reward_models.BUILTIN_REWARDS``);
- ``learned:<folder>``: a reward model (reward_models/learned.py);
- ``path/to/file.py:function``: a Python file, loaded by path (relative paths from the working folder);
- ``module.path:function``: an importable module;
- any other bare name: an entry point in the group ``rl_lora.reward_models`` that an installed
  package declares (``[project.entry-points."rl_lora.reward_models"] my_score = "my_pkg.scores:score"``).

Built-in names win over entry points of the same name. Every failure is a RewardError naming the
reward and what is missing, raised before any model loads.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

from reward_models import BUILTIN_REWARDS
from rl_lora.config.schema import LEARNED_PREFIX
from rl_lora.utils.errors import RewardError
from rl_lora.utils.plugins import PluginKind, resolve

ENTRY_POINT_GROUP = "rl_lora.reward_models"

REWARD_PLUGINS = PluginKind("reward", ENTRY_POINT_GROUP, BUILTIN_REWARDS, RewardError)


def resolve_reward(name: str) -> Callable:
    """The callable a recipe's reward name refers to. Raises RewardError if it cannot be found."""
    if name.startswith(LEARNED_PREFIX):
        from reward_models.learned import LearnedReward  # torch + transformers: only when asked for

        return LearnedReward(name.removeprefix(LEARNED_PREFIX))
    return resolve(REWARD_PLUGINS, name)


def check_reward(name: str, kwargs: dict[str, Any]) -> None:
    """Fail now, before any policy loads, if ``name`` cannot be found or ``kwargs`` would not be read.

    A learned reward's model is loaded here (and kept for the run), so a broken reward-model folder
    fails before the policy loads rather than at the first training step.
    """
    fn = resolve_reward(name)
    check_keywords(name, fn, kwargs)
    load = getattr(fn, "load", None)
    if name.startswith(LEARNED_PREFIX) and load is not None:
        load(base=kwargs.get("base"))


def check_keywords(name: str, fn: Callable, kwargs: dict[str, Any]) -> None:
    """Refuse keywords ``fn`` would not read.

    A function whose catch-all is named ``**_`` (or ``**_anything``) declares that it ignores extra
    keywords, so a misspelt option would vanish there: those are checked. One with a named catch-all
    (``**options``) may read any keyword and is not.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check against
        return
    catch_all = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    if catch_all and not catch_all[0].name.startswith("_"):
        return
    named = {p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD}
    unknown = sorted(set(kwargs) - named)
    if unknown:
        raise RewardError(f"reward '{name}' takes no keyword {', '.join(map(repr, unknown))} (kwargs in the recipe)")


# Keywords TRL passes that are not dataset columns.
_TRAINER_KEYWORDS = {"completion_ids", "trainer_state", "log_extra", "log_metric"}


def required_columns(fn: Callable, kwargs: dict[str, Any]) -> list[str]:
    """The dataset columns ``fn`` cannot run without: its keyword parameters with no default, after
    ``prompts`` and ``completions``, that the recipe's kwargs do not give."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    positional = [p for p in named if p.kind is p.POSITIONAL_OR_KEYWORD][:2]  # prompts, completions
    return [p.name for p in named if p not in positional and p.default is inspect.Parameter.empty
            and p.name not in kwargs and p.name not in _TRAINER_KEYWORDS]


def check_columns(what: str, fn: Callable, kwargs: dict[str, Any], columns: list[str], dataset: str) -> None:
    """Refuse ``fn`` (named by ``what``, e.g. "reward 'x.py:score'") if it needs a column the dataset lacks."""
    missing = [c for c in required_columns(fn, kwargs) if c not in columns]
    if missing:
        have = ", ".join(columns) or "none besides 'prompt'"
        raise RewardError(f"{what} needs column '{missing[0]}', which dataset '{dataset}' does not have "
                          f"(its columns: {have})")


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


def trl_reward(name: str, fn: Callable, kwargs: dict[str, Any]) -> Callable:
    """Adapt a plug-in to TRL's reward signature (GRPO; the project's PPO calls it the same way),
    checking every score it returns and reporting its failure as the plug-in's, with the step."""

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
