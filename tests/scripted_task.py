"""A test task whose held-out figures are scripted per process: importable as ``scripted_task:make_task``
(tests/ is on sys.path). It trains on the built-in arithmetic prompts; ``evaluate`` returns the next value of
``scripts[RANK]`` (one value per evaluation, the step-0 one first; the last value repeats), so two processes
of one run can be made to disagree on the guard's figures."""

from __future__ import annotations

import os
from typing import Any

from rl_lora.config.schema import RecipeConfig
from rl_lora.tasks.arithmetic.task import ArithmeticTask
from rl_lora.tasks.base import Metric


class ScriptedTask:
    metric = Metric("accuracy")

    def __init__(self, config: RecipeConfig, scripts: list[list[float]]) -> None:
        self._inner = ArithmeticTask(config)
        self._script = scripts[int(os.environ.get("RANK", "0"))]
        self._calls = 0

    def train_dataset(self, tokenizer: Any) -> Any:
        return self._inner.train_dataset(tokenizer)

    def evaluate(self, model: Any, tokenizer: Any, max_new_tokens: int | None) -> dict[str, float]:
        value = self._script[min(self._calls, len(self._script) - 1)]
        self._calls += 1
        return {"accuracy": value}


def make_task(config: RecipeConfig, scripts: list[list[float]]) -> ScriptedTask:
    return ScriptedTask(config, scripts)


_steps = 0


def rising(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """A training reward that rises every call (the guard's proxy going up), with spread inside a group."""
    global _steps
    _steps += 1
    return [_steps + c.count("1") / max(len(c), 1) for c in completions]
