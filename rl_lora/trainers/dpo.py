"""DPO through TRL's DPOTrainer: preference pairs -> a policy that prefers the chosen side.

With a LoRA spec TRL wraps the policy with PEFT and the reference is the same network with its
adapter disabled (no second copy). With ``lora.rank: full`` the reference is an explicit frozen copy
of the policy: TRL would otherwise try to load one from the model's (empty) hub name.

The pairs are the built-in task's (chosen = the answer, rejected = the policy's own wrong sample;
rl_lora/tasks/preferences.py) or a preference file. Either way the held-out metric is the built-in
task's greedy exact-answer accuracy on the same held-out problems as GRPO, since the task is what
the preferences are meant to improve.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from trl import DPOConfig, DPOTrainer

from rl_lora.config import BUILTIN_PREFERENCES, RecipeConfig
from rl_lora.errors import DataError
from rl_lora.evaluation import exact_answer_accuracy
from rl_lora.lora import keep_adapters_fp32, peft_config
from rl_lora.models.builtin import BUILTIN_PREFIX
from rl_lora.models.loading import load_policy, policy_tokenizer_and_context
from rl_lora.tasks import arithmetic
from rl_lora.tasks.preferences import (
    RowCheck,
    builtin_pairs,
    is_conversational,
    prompt_length_check,
    read_preference_file,
)
from rl_lora.trainers.common import Algorithm, Loaded, RestoreTokenCount, quiet, shared_training_args
from rl_lora.trainers.nonfinite import NonFiniteGuard


class GuardedDPOTrainer(NonFiniteGuard, DPOTrainer):
    """TRL's DPOTrainer, skipping steps with a non-finite loss or gradient (rl_lora/trainers/nonfinite.py)."""


def check_preferences(config: RecipeConfig) -> list[dict[str, Any]] | None:
    """The validated rows of the recipe's preference file, or None for the built-in pairs."""
    source = config.preferences_source
    return None if source == BUILTIN_PREFERENCES else read_preference_file(source, prompt_limit(config))


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
    if is_conversational(rows) and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"dataset '{dataset}' is conversational (lists of messages) but the tokenizer of '{source}' has no "
            "chat template to render them"
        )


def policy_pairs(
    config: RecipeConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: str,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The built-in (training, held-out) pairs sampled from ``model``; cached beside the built-in model."""
    # Pairs are cached beside the built-in model, keyed by the data; a 4-bit base samples other answers,
    # so its pairs are drawn afresh each time rather than mixed into the fp32 model's cache.
    cached = config.model.policy.startswith(BUILTIN_PREFIX) and config.model.quantization == "none"
    cache_dir = Path(source) if cached else None
    return builtin_pairs(cache_dir, model, tokenizer, config.data)


def load(config: RecipeConfig, rows: list[dict[str, Any]] | None, progress: bool) -> Loaded:
    _, held_out = arithmetic.split(config.data)
    model, tokenizer, source = load_policy(config.model, config.data, progress=progress)
    if rows is None:
        rows, _ = policy_pairs(config, model, tokenizer, source)
    check_chat_template(rows, tokenizer, source, config.preferences_source)
    max_new = arithmetic.answer_tokens(config.data)

    def evaluate(m: Any) -> dict[str, float]:
        return {"accuracy": exact_answer_accuracy(m, tokenizer, held_out, max_new)}

    return Loaded(model, tokenizer, source, Dataset.from_list(rows), evaluate, info={"train_pairs": len(rows)})


def dpo_args(config: RecipeConfig, lr: float, output_dir: Path) -> DPOConfig:
    d = config.dpo
    return DPOConfig(
        **shared_training_args(config, lr, output_dir),
        beta=d.beta,
        loss_type=list(d.loss_type),
        loss_weights=d.loss_weights,
        max_length=d.max_length,
    )


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
