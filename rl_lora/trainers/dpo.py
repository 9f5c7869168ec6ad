"""DPO through TRL's DPOTrainer: preference pairs -> a policy that prefers the chosen side.

With a LoRA spec TRL wraps the policy with PEFT and the reference is the same network with its
adapter disabled (no second copy). With ``lora.rank: full`` the reference is an explicit frozen copy
of the policy: TRL would otherwise try to load one from the model's (empty) hub name.

The pairs are the task's own (the arithmetic task's: chosen = the answer, rejected = the policy's own
wrong sample; rl_lora/tasks/arithmetic_pairs.py) or a preference source. Either way the held-out metric is
the task's (``data.task``): for arithmetic, greedy exact-answer accuracy on the same held-out problems as
GRPO, since the task is what the preferences are meant to improve.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from trl import DPOConfig, DPOTrainer

from rl_lora.config import BUILTIN_PREFERENCES, RecipeConfig
from rl_lora.errors import ConfigError
from rl_lora.lora import keep_adapters_fp32, peft_config
from rl_lora.models.builtin import BUILTIN_PREFIX
from rl_lora.models.loading import load_policy, policy_tokenizer_and_context
from rl_lora.tasks.chat import require_chat_template
from rl_lora.tasks.preferences import RowCheck, is_conversational, prompt_length_check, read_preference_file
from rl_lora.trainers.common import (
    Algorithm,
    Loaded,
    RestoreTokenCount,
    checked_task,
    quiet,
    shared_training_args,
    trl_config,
)
from rl_lora.trainers.nonfinite import NonFiniteGuard


class GuardedDPOTrainer(NonFiniteGuard, DPOTrainer):
    """TRL's DPOTrainer, skipping steps with a non-finite loss or gradient (rl_lora/trainers/nonfinite.py)."""


def read_preferences(config: RecipeConfig, source: str) -> list[dict[str, Any]]:
    """The validated rows of a preference source, with the prompt-length check and, for conversational rows,
    the policy's chat template checked (from its tokenizer files, no weights) before any model loads."""
    rows = read_preference_file(source, prompt_limit(config), config.data.split, config.data.subset)
    if is_conversational(rows):
        found = policy_tokenizer_and_context(config.model)
        if found is not None:
            require_chat_template(found[0], config.model.policy, source)
    return rows


def check_preferences(config: RecipeConfig) -> tuple[Any, list[dict[str, Any]] | None, dict[str, Any]]:
    """(task, the validated rows of the recipe's preference source or None for the task's own pairs, figures)."""
    task, info = checked_task(config)
    source = config.preferences_source
    if source == BUILTIN_PREFERENCES:
        require_task_pairs(task, config)
        return task, None, info
    return task, read_preferences(config, source), info


def require_task_pairs(task: Any, config: RecipeConfig) -> None:
    if not hasattr(task, "preference_pairs"):
        raise ConfigError(f"data.preferences: the task '{config.data.task}' makes no preference pairs of its own "
                          "(the arithmetic task does): name a preference file or dataset in data.preferences")


def prompt_limit(config: RecipeConfig) -> RowCheck | None:
    """The check refusing preference prompts too long for the trainer's max_length or the model's context
    (the tokenizer and config are read, no weights); None when the tokenizer cannot be had without them."""
    found = policy_tokenizer_and_context(config.model)
    if found is None:
        return None
    tokenizer, context = found
    key = "dpo.max_length" if config.algorithm == "dpo" else "reward_model.max_length"
    limit = config.dpo.max_length if config.algorithm == "dpo" else config.reward_model.max_length
    if context is not None and context < limit:
        key, limit = f"the context of model '{config.model.policy}'", context
    return prompt_length_check(tokenizer, limit, key)


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
    cached = config.model.policy.startswith(BUILTIN_PREFIX) and config.model.quantization == "none"
    cache_dir = Path(source) if cached else None
    return task.preference_pairs(model, tokenizer, cache_dir)


def load(config: RecipeConfig, checked: tuple[Any, list[dict[str, Any]] | None, dict[str, Any]],
         progress: bool) -> Loaded:
    task, rows, info = checked
    model, tokenizer, source = load_policy(config.model, config.data, progress=progress)
    if rows is None:
        rows, _ = policy_pairs(task, config, model, tokenizer, source)
    check_chat_template(rows, tokenizer, source, config.preferences_source)

    def evaluate(m: Any) -> dict[str, float]:
        return task.evaluate(m, tokenizer, None)

    return Loaded(model, tokenizer, source, Dataset.from_list(rows), evaluate, task.metric,
                  info={**info, "train_pairs": len(rows)})


def dpo_args(config: RecipeConfig, lr: float, output_dir: Path) -> DPOConfig:
    d = config.dpo
    return trl_config(DPOConfig, config, dict(
        **shared_training_args(config, lr, output_dir),
        beta=d.beta,
        loss_type=list(d.loss_type),
        loss_weights=d.loss_weights,
        max_length=d.max_length,
    ))


def build_dpo_trainer(
    config: RecipeConfig, loaded: Loaded, lr: float, output_dir: Path, callbacks: list[TrainerCallback]
) -> DPOTrainer:
    lora = peft_config(config.lora, model=loaded.model)
    reference = None
    if lora is None:  # full-parameter: the reference is the starting policy, frozen
        reference = copy.deepcopy(loaded.model).eval()
        reference.requires_grad_(False)
    trainer = GuardedDPOTrainer(
        model=loaded.model,
        ref_model=reference,
        args=dpo_args(config, lr, output_dir),
        train_dataset=loaded.train_dataset,
        processing_class=loaded.tokenizer,
        peft_config=lora,
        callbacks=callbacks,
    )
    trainer.max_nonfinite_steps = config.train.max_nonfinite_steps
    if config.model.quantization != "none":
        keep_adapters_fp32(trainer.model)  # TRL casts QLoRA adapters to bf16; keep them fp32 as for GRPO
    trainer.add_callback(RestoreTokenCount(trainer))
    return quiet(trainer)


ALGORITHM = Algorithm(
    check=check_preferences,
    load=load,
    build=build_dpo_trainer,
    final_metrics={"final_margin": "rewards/margins", "final_train_accuracy": "rewards/accuracies"},
)
