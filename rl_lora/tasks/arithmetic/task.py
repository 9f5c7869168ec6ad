"""The built-in task behind the task protocol (rl_lora/tasks/base.py): headline metric ``accuracy``, greedy
exact-answer accuracy on the held-out problems (rl_lora/tasks/arithmetic/problems.py). It also makes DPO's and
the reward model's built-in preference pairs (rl_lora/tasks/arithmetic/pairs.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from datasets import Dataset

from rl_lora.config.schema import RecipeConfig
from rl_lora.tasks.arithmetic.pairs import builtin_pairs
from rl_lora.tasks.arithmetic.problems import (
    Problem,
    answer_tokens,
    exact_answer_accuracy,
    render_prompts,
    split,
    to_dataset,
)
from rl_lora.tasks.base import RATE, Metric

ACCURACY = Metric("accuracy", True, "greedy exact-answer accuracy on the held-out problems", unit=RATE)


class ArithmeticTask:
    """The built-in task behind the task protocol."""

    metric = ACCURACY

    def __init__(self, config: RecipeConfig) -> None:
        self.spec = config.data
        # every held-out problem counts 1/eval_size (split() refuses an eval_size that leaves no training data)
        self.metric = replace(ACCURACY, resolution=1 / self.spec.eval_size)
        self._split: tuple[list[Problem], list[Problem]] | None = None
        self._rendered: list[Problem] | None = None

    @property
    def columns(self) -> list[str]:
        return ["answer"] + (["answer_rule"] if self.spec.prompt_style == "chat" else [])

    def check(self) -> dict[str, Any]:
        self._split = split(self.spec)
        return {}

    def problems(self) -> tuple[list[Problem], list[Problem]]:
        """(train, held-out) problems, unrendered."""
        if self._split is None:
            self._split = split(self.spec)
        return self._split

    def train_dataset(self, tokenizer: Any) -> Dataset:
        return to_dataset(render_prompts(self.problems()[0], self.spec, tokenizer))

    def evaluate(self, model: Any, tokenizer: Any, max_new_tokens: int | None) -> dict[str, float]:
        if self._rendered is None:
            self._rendered = render_prompts(self.problems()[1], self.spec, tokenizer)
        tokens = self.spec.eval_max_new_tokens or max_new_tokens or answer_tokens(self.spec)
        return {ACCURACY.name: exact_answer_accuracy(model, tokenizer, self._rendered, tokens)}

    def preference_pairs(self, model: Any, tokenizer: Any, cache_dir: Any) -> tuple[list[dict], list[dict]]:
        """(training, held-out) pairs from the policy's own wrong samples (rl_lora/tasks/arithmetic/pairs.py)."""
        return builtin_pairs(cache_dir, model, tokenizer, self.spec)


def make_task(config: RecipeConfig) -> ArithmeticTask:
    return ArithmeticTask(config)
