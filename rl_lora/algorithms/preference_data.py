"""Preference data for the trainers that learn from pairs (DPO, reward models): reading a recipe's preference
source with the checks that need the policy's tokenizer, and the task's own pairs sampled from the policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rl_lora.config.schema import RecipeConfig
from rl_lora.data.chat import require_chat_template, require_policy_chat_template
from rl_lora.data.preferences import (
    RowCheck,
    is_conversational,
    prompt_limit_check,
    read_preference_file,
    split_rows,
)
from rl_lora.models.loading import policy_tokenizer_and_context
from rl_lora.models.policies import classify
from rl_lora.utils.errors import ConfigError

HELD_OUT_FRACTION = 0.1  # of a preference file, when no data.eval_preferences file is named

Pairs = list[dict[str, Any]]


def read_preferences(config: RecipeConfig, source: str) -> list[dict[str, Any]]:
    """The validated rows of a preference source, with the prompt-length check and, for conversational rows,
    the policy's chat template checked (from its tokenizer files, no weights) before any model loads."""
    rows = read_preference_file(source, prompt_limit(config), config.data.split, config.data.subset)
    if is_conversational(rows):
        require_policy_chat_template(config.model, source)
    return rows


def read_split_preferences(config: RecipeConfig, source: str) -> tuple[Pairs, Pairs]:
    """(training, held-out) pairs of a preference source: the held-out ones from ``data.eval_preferences``, or a
    seeded ``HELD_OUT_FRACTION`` of the source's rows (``data.split_seed``), never trained on."""
    rows = read_preferences(config, source)
    held = getattr(config.data, "eval_preferences", None)
    if held is not None:
        return rows, read_preferences(config, held)
    return split_rows(rows, HELD_OUT_FRACTION, config.data.split_seed)


def require_task_pairs(task: Any, config: RecipeConfig) -> None:
    if not hasattr(task, "preference_pairs"):
        raise ConfigError(f"data.preferences: the task '{config.data.task}' makes no preference pairs of its own "
                          "(the arithmetic task does): name a preference file or dataset in data.preferences")


def prompt_limit(config: RecipeConfig) -> RowCheck | None:
    """The check refusing preference prompts too long for the trainer's max_length or the model's context
    (the tokenizer and config are read, no weights); None when the tokenizer cannot be had without them."""
    return prompt_limit_check(config, policy_tokenizer_and_context(config.model))


def check_chat_template(rows: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, source: str,
                        dataset: str) -> None:
    if is_conversational(rows):
        require_chat_template(tokenizer, source, dataset)


def policy_pairs(
    task: Any, config: RecipeConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: str,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The task's own (training, held-out) pairs sampled from ``model``; cached beside the built-in model."""
    # Pairs are cached beside the built-in model, keyed by the data; a 4-bit base samples other answers,
    # so its pairs are drawn afresh each time rather than mixed into the fp32 model's cache.
    policy = classify(config.model.policy)
    cached = policy.source is not None and policy.source.caches_pairs and config.model.quantization == "none"
    cache_dir = Path(source) if cached else None
    return task.preference_pairs(model, tokenizer, cache_dir)
