"""Finding a reward by the name a recipe gives it.

Five forms, tried in this order:

- a built-in name: ``exact_answer``, ``format``, ``length_penalty`` (``BUILTIN_REWARDS``);
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
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from reward_models.exact_answer import exact_answer
from reward_models.shaping import answer_format, length_penalty
from rl_lora.errors import RewardError

ENTRY_POINT_GROUP = "rl_lora.reward_models"
LEARNED_PREFIX = "learned:"

BUILTIN_REWARDS: dict[str, Callable] = {
    "exact_answer": exact_answer,
    "format": answer_format,
    "length_penalty": length_penalty,
}


def resolve_reward(name: str) -> Callable:
    """The callable a recipe's reward name refers to. Raises RewardError if it cannot be found."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    if name.startswith(LEARNED_PREFIX):
        from reward_models.learned import LearnedReward  # torch + transformers: only when asked for

        return LearnedReward(name.removeprefix(LEARNED_PREFIX))
    if ":" in name:
        target, _, attr = name.rpartition(":")
        if target.endswith(".py") or "/" in target or "\\" in target:
            return _from_file(name, Path(target), attr)
        return _from_module(name, target, attr)
    return _from_entry_point(name)


def check_reward(name: str, kwargs: dict[str, Any]) -> None:
    """Fail now, before any policy loads, if ``name`` cannot be found or ``kwargs`` would not be read.

    A learned reward's model is loaded here (and kept for the run), so a broken reward-model folder
    fails before the policy loads rather than at the first training step.
    """
    fn = resolve_reward(name)
    _check_keywords(name, fn, kwargs)
    load = getattr(fn, "load", None)
    if name.startswith(LEARNED_PREFIX) and load is not None:
        load(base=kwargs.get("base"))


def _check_keywords(name: str, fn: Callable, kwargs: dict[str, Any]) -> None:
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


def _callable_attr(name: str, owner: Any, attr: str, where: str) -> Callable:
    fn = getattr(owner, attr, None)
    if fn is None or not callable(fn):
        raise RewardError(f"reward '{name}': {where} has no callable '{attr}'")
    return fn


def _from_module(name: str, module_name: str, attr: str) -> Callable:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(f"reward '{name}': cannot import module '{module_name}' ({exc})") from None
    return _callable_attr(name, module, attr, f"module '{module_name}'")


@functools.cache
def _load_file(path: Path, mtime_ns: int) -> Any:
    """Execute a reward file once per version of it, as a module of its own."""
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:10]
    module_name = f"rl_lora_reward_file_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RewardError(f"file '{path}' cannot be loaded as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # so pickling and dataclasses inside the file work
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise RewardError(f"file '{path}' raised while loading: {type(exc).__name__}: {exc}") from exc
    return module


def _from_file(name: str, path: Path, attr: str) -> Callable:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise RewardError(f"reward '{name}': file '{path}' does not exist")
    try:
        module = _load_file(path, path.stat().st_mtime_ns)
    except RewardError as exc:
        raise RewardError(f"reward '{name}': {exc}") from exc.__cause__
    return _callable_attr(name, module, attr, f"file '{path}'")


def _from_entry_point(name: str) -> Callable:
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        installed = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
        known = ", ".join(sorted(BUILTIN_REWARDS))
        plugins = ", ".join(installed) if installed else "none installed"
        raise RewardError(
            f"unknown reward '{name}': not a built-in ({known}), not an entry point in group "
            f"'{ENTRY_POINT_GROUP}' ({plugins}), and not 'module.path:function' or 'path/to/file.py:function'"
        )
    ep = found[0]
    dist = getattr(ep.dist, "name", None) or "an installed package"
    try:
        fn = ep.load()
    except Exception as exc:
        raise RewardError(
            f"reward '{name}': entry point '{ep.value}' (from {dist}) cannot be loaded: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(fn):
        raise RewardError(f"reward '{name}': entry point '{ep.value}' (from {dist}) is not callable")
    return fn
