"""Finding a plug-in (a reward, a metric, a task) by the name a recipe gives it.

Four forms, tried in this order:

- a built-in name (the caller's table);
- ``path/to/file.py:attr``: a Python file, loaded by path (relative paths from the working folder);
- ``module.path:attr``: an importable module;
- any other bare name: an entry point in the caller's group that an installed package declares.

Every failure raises the caller's error class with one line naming the plug-in and what is missing.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PluginKind:
    """What is being looked up: its word in messages, its entry-point group and its built-in names."""

    word: str  # "reward", "task", ...
    group: str  # entry-point group
    builtins: Mapping[str, Any]
    error: type[Exception]  # what a failed lookup raises: RewardError, ConfigError, ...


def resolve(kind: PluginKind, name: str) -> Callable:
    """The callable ``name`` refers to, or ``kind.error`` naming what could not be found."""
    if name in kind.builtins:
        return kind.builtins[name]
    if ":" in name:
        target, _, attr = name.rpartition(":")
        if target.endswith(".py") or "/" in target or "\\" in target:
            return _from_file(kind, name, Path(target), attr)
        return _from_module(kind, name, target, attr)
    return _from_entry_point(kind, name)


def _callable_attr(kind: PluginKind, name: str, owner: Any, attr: str, where: str) -> Callable:
    fn = getattr(owner, attr, None)
    if fn is None or not callable(fn):
        raise kind.error(f"{kind.word} '{name}': {where} has no callable '{attr}'")
    return fn


def _from_module(kind: PluginKind, name: str, module_name: str, attr: str) -> Callable:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise kind.error(f"{kind.word} '{name}': cannot import module '{module_name}' ({exc})") from None
    return _callable_attr(kind, name, module, attr, f"module '{module_name}'")


@functools.cache
def _load_file(path: Path, mtime_ns: int) -> Any:
    """Execute a plug-in file once per version of it, as a module of its own (so pickling works inside it)."""
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:10]
    module_name = f"rl_lora_plugin_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"file '{path}' cannot be loaded as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[module_name]
        raise
    return module


def _from_file(kind: PluginKind, name: str, path: Path, attr: str) -> Callable:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise kind.error(f"{kind.word} '{name}': file '{path}' does not exist")
    try:
        module = _load_file(path, path.stat().st_mtime_ns)
    except Exception as exc:
        raise kind.error(
            f"{kind.word} '{name}': file '{path}' raised while loading: {type(exc).__name__}: {exc}"
        ) from exc
    return _callable_attr(kind, name, module, attr, f"file '{path}'")


def _from_entry_point(kind: PluginKind, name: str) -> Callable:
    found = [ep for ep in entry_points(group=kind.group) if ep.name == name]
    if not found:
        installed = sorted({ep.name for ep in entry_points(group=kind.group)})
        close = difflib.get_close_matches(name, [*kind.builtins, *installed], n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        known = ", ".join(sorted(kind.builtins))
        plugins = ", ".join(installed) if installed else "none installed"
        raise kind.error(
            f"unknown {kind.word} '{name}'{hint} (not a built-in ({known}), not an entry point in group "
            f"'{kind.group}' ({plugins}), and not 'module.path:function' or 'path/to/file.py:function')"
        )
    ep = found[0]
    dist = getattr(ep.dist, "name", None) or "an installed package"
    try:
        fn = ep.load()
    except Exception as exc:
        raise kind.error(
            f"{kind.word} '{name}': entry point '{ep.value}' (from {dist}) cannot be loaded: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not callable(fn):
        raise kind.error(f"{kind.word} '{name}': entry point '{ep.value}' (from {dist}) is not callable")
    return fn
