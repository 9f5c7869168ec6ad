"""DPO through TRL's DPOTrainer: preference pairs -> a policy that prefers the chosen side.

With a LoRA spec TRL wraps the policy with PEFT and the reference is the same network with its
adapter disabled (no second copy). With ``lora.rank: full`` the reference is an explicit frozen copy
of the policy: TRL would otherwise try to load one from the model's (empty) hub name.

The pairs are the task's own (the arithmetic task's: chosen = the answer, rejected = the policy's own
wrong sample; rl_lora/tasks/arithmetic/pairs.py) or a preference source. Either way the held-out metric is
the task's (``data.task``): for arithmetic, greedy exact-answer accuracy on the same held-out problems as
GRPO, since the task is what the preferences are meant to improve.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from datasets import Dataset
from torch import nn
from trl import DPOConfig, DPOTrainer

from rl_lora.adapters.lora import keep_adapters_fp32, peft_config
from rl_lora.algorithms.common import (
    RestoreTokenCount,
    TrlTrainerHandle,
    check_trl_options,
    checked_task,
    quiet,
    shared_training_args,
    trl_config,
)
from rl_lora.algorithms.contract import Loaded, PairwiseAlgorithm
from rl_lora.algorithms.preference_data import check_chat_template, policy_pairs, read_preferences, require_task_pairs
from rl_lora.config.schema import BUILTIN_PREFERENCES, DpoRecipe
from rl_lora.models.loading import load_policy
from rl_lora.training.nonfinite import NonFiniteGuard


class GuardedDPOTrainer(TrlTrainerHandle, NonFiniteGuard, DPOTrainer):
    """TRL's DPOTrainer, skipping steps with a non-finite loss or gradient (rl_lora/training/nonfinite.py)."""

    def reference_model(self) -> nn.Module | None:
        return self.ref_model


Checked = tuple[Any, list[dict[str, Any]] | None, dict[str, Any]]


def check_preferences(config: DpoRecipe) -> Checked:
    """(task, the validated rows of the recipe's preference source or None for the task's own pairs, figures)."""
    task, info = checked_task(config)
    source = config.preferences_source
    if source == BUILTIN_PREFERENCES:
        require_task_pairs(task, config)
        checked: Checked = (task, None, info)
    else:
        checked = (task, read_preferences(config, source), info)
    check_trl_options(DPOConfig, config)
    return checked


def load(config: DpoRecipe, checked: Checked, progress: bool) -> Loaded:
    task, rows, info = checked
    model, tokenizer, source = load_policy(config.model, config.data, progress=progress)
    if rows is None:
        rows, _ = policy_pairs(task, config, model, tokenizer, source)
    check_chat_template(rows, tokenizer, source, config.preferences_source)

    def evaluate(m: Any) -> dict[str, float]:
        return task.evaluate(m, tokenizer, None)

    return Loaded(model, tokenizer, source, Dataset.from_list(rows), evaluate, task.metric,
                  info={**info, "train_pairs": len(rows)})


def dpo_args(config: DpoRecipe, lr: float, output_dir: Path) -> DPOConfig:
    d = config.dpo
    return trl_config(DPOConfig, config, dict(
        **shared_training_args(config, lr, output_dir),
        beta=d.beta,
        loss_type=list(d.loss_type),
        loss_weights=d.loss_weights,
        max_length=d.max_length,
    ))


def build_dpo_trainer(config: DpoRecipe, loaded: Loaded, lr: float, output_dir: Path) -> GuardedDPOTrainer:
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
    )
    trainer.max_nonfinite_steps = config.train.max_nonfinite_steps
    if config.model.quantization != "none":
        keep_adapters_fp32(trainer.model)  # TRL casts QLoRA adapters to bf16; keep them fp32 as for GRPO
    trainer.add_callback(RestoreTokenCount(trainer))
    return quiet(trainer)


ALGORITHM = PairwiseAlgorithm(
    "dpo", {"final_margin": "rewards/margins", "final_train_accuracy": "rewards/accuracies"},
    check_preferences, load, build_dpo_trainer,
)
