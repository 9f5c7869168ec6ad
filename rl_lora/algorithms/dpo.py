"""DPO through TRL's DPOTrainer: preference pairs -> a policy that prefers the chosen side.

With a LoRA spec TRL wraps the policy with PEFT and the reference is the same network with its
adapter disabled (no second copy). With ``lora.rank: full`` the reference is an explicit frozen copy
of the policy: TRL would otherwise try to load one from the model's (empty) hub name.

The pairs are the task's own (the arithmetic task's: chosen = the answer, rejected = the policy's own
wrong sample; rl_lora/tasks/arithmetic/pairs.py) or a preference source.

What the run is judged on follows what it was given:

- the task's own pairs: the task's metric (for arithmetic, greedy exact-answer accuracy on the same held-out
  problems as GRPO), since the task is the data;
- a preference source: DPO's own held-out figures on pairs never trained on (``data.eval_preferences``, or a
  seeded 10% of the source), as TRL's ``DPOTrainer.evaluate`` reports them (``rewards/accuracies``,
  ``rewards/margins``, ``rewards/chosen``, ``rewards/rejected``); ``rewards/accuracies`` is the headline. The
  built-in arithmetic task is not evaluated: the user's pairs are not arithmetic problems. A task other than
  the built-in one named in ``data.task`` (``dataset`` with its metrics, or a plug-in) is evaluated too, and
  its metric is the headline.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
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
from rl_lora.algorithms.preference_data import (
    Pairs,
    check_chat_template,
    policy_pairs,
    read_split_preferences,
    require_task_pairs,
)
from rl_lora.config.schema import BUILTIN_PREFERENCES, DpoRecipe
from rl_lora.data.preferences import is_conversational
from rl_lora.models.loading import load_policy
from rl_lora.tasks.base import RATE, Metric
from rl_lora.training.distributed import gather_container_parameters
from rl_lora.training.nonfinite import NonFiniteGuard
from rl_lora.utils.errors import DataError

BUILTIN_TASK = "arithmetic"
# TRL 1.16's DPOTrainer.evaluate keys (eval_ + these): the implicit rewards beta * log(pi / pi_ref) of each side.
HELD_OUT_KEYS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
PAIR_ACCURACY = Metric("rewards/accuracies", True, "implicit-reward accuracy on held-out preference pairs (the "
                       "chosen side's beta * log(pi / pi_ref) above the rejected side's; TRL's "
                       "eval_rewards/accuracies)", unit=RATE)


class GuardedDPOTrainer(TrlTrainerHandle, NonFiniteGuard, DPOTrainer):
    """TRL's DPOTrainer, skipping steps with a non-finite loss or gradient (rl_lora/training/nonfinite.py)."""

    def reference_model(self) -> nn.Module | None:
        return self.ref_model


# (the task or None, (training, held-out) pairs of the preference source or None for the task's own, figures)
Checked = tuple[Any, tuple[Pairs, Pairs] | None, dict[str, Any]]


def check_preferences(config: DpoRecipe) -> Checked:
    """The task the run is judged on (None: a preference source under the built-in task, judged on its held-out
    pairs alone), the (training, held-out) pairs of the recipe's preference source or None for the task's own
    pairs, and figures for summary.json."""
    source = config.preferences_source
    if source == BUILTIN_PREFERENCES:
        task, info = checked_task(config)
        require_task_pairs(task, config)
        checked: Checked = (task, None, info)
    else:
        task, info = checked_task(config) if config.data.task != BUILTIN_TASK else (None, {})
        train, held = read_split_preferences(config, source)
        kinds = ["conversational" if is_conversational(p) else "plain text" for p in (train, held)]
        if kinds[0] != kinds[1]:
            raise DataError(f"data.eval_preferences '{config.data.eval_preferences}': its pairs are {kinds[1]} but "
                            f"data.preferences '{source}' holds {kinds[0]} pairs")
        checked = (task, (train, held), info)
    check_trl_options(DPOConfig, config)
    return checked


class HeldOutPairs:
    """DPO's held-out figures on pairs never trained on, computed by TRL's own DPO loss in eval mode, as
    ``DPOTrainer.evaluate`` reports them (HELD_OUT_KEYS), without the callbacks and log record ``evaluate`` makes.

    The trainer is known once built (``build_dpo_trainer`` sets it); every process calls this (TRL gathers the
    figures across processes, so all get the same values). Each batch's figure is weighted by its pairs.
    ``task``: a named task's own evaluation, whose figures are added.
    """

    def __init__(self, pairs: Pairs, task: Callable[[Any], dict[str, float]] | None = None) -> None:
        self.pairs = pairs
        self.task = task
        self.trainer: GuardedDPOTrainer | None = None

    def __call__(self, model: Any) -> dict[str, float]:
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError("DPO's held-out pairs are evaluated by its trainer: build it first")
        store = trainer._metrics["eval"]
        store.clear()
        weights: list[int] = []
        was_training = model.training
        model.eval()  # TRL's loss files its figures under "eval" when the policy is in eval mode
        try:
            with torch.no_grad():
                for batch in trainer.get_eval_dataloader():
                    batch = trainer._prepare_inputs(batch)
                    trainer.compute_loss(model, batch)
                    weights.append(len(batch["input_ids"]) // 2)  # a batch is [chosen..., rejected...]
        finally:
            model.train(was_training)
        figures = {key: sum(w * v for w, v in zip(weights, store[key], strict=True)) / sum(weights)
                   for key in HELD_OUT_KEYS}
        store.clear()
        return {**figures, **self.task(model)} if self.task is not None else figures


def load(config: DpoRecipe, checked: Checked, progress: bool) -> Loaded:
    task, pairs, info = checked
    model, tokenizer, source = load_policy(config.model, config.data, progress=progress)
    if pairs is None:  # the task's own pairs: the task is the data, and its metric judges the run
        rows, _ = policy_pairs(task, config, model, tokenizer, source)
        check_chat_template(rows, tokenizer, source, config.preferences_source)

        def evaluate(m: Any) -> dict[str, float]:
            return task.evaluate(m, tokenizer, None)

        return Loaded(model, tokenizer, source, Dataset.from_list(rows), evaluate, task.metric,
                      info={**info, "train_pairs": len(rows)})
    rows, held = pairs
    check_chat_template(rows, tokenizer, source, config.preferences_source)
    if task is None:  # judged on the held-out pairs alone
        held_out, metric = HeldOutPairs(held), replace(PAIR_ACCURACY, resolution=1 / len(held))
    else:  # a task named beside the pairs: its metric is the headline, the pairs' figures beside it
        held_out, metric = HeldOutPairs(held, lambda m: task.evaluate(m, tokenizer, None)), task.metric
    return Loaded(model, tokenizer, source, Dataset.from_list(rows), held_out, metric,
                  info={**info, "train_pairs": len(rows), "held_out_pairs": len(held)})


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
    held_out = loaded.evaluate if isinstance(loaded.evaluate, HeldOutPairs) else None
    trainer = GuardedDPOTrainer(
        model=loaded.model,
        ref_model=reference,
        args=dpo_args(config, lr, output_dir),
        train_dataset=loaded.train_dataset,
        eval_dataset=Dataset.from_list(held_out.pairs) if held_out is not None else None,
        processing_class=loaded.tokenizer,
        peft_config=lora,
    )
    if held_out is not None:
        held_out.trainer = trainer
    trainer.max_nonfinite_steps = config.train.max_nonfinite_steps
    if config.model.quantization != "none":
        keep_adapters_fp32(trainer.model)  # TRL casts QLoRA adapters to bf16; keep them fp32 as for GRPO
    trainer.add_callback(RestoreTokenCount(trainer))
    gather_container_parameters(trainer.model, config.distributed)
    return quiet(trainer)


ALGORITHM = PairwiseAlgorithm(
    "dpo", {"final_margin": "rewards/margins", "final_train_accuracy": "rewards/accuracies"},
    check_preferences, load, build_dpo_trainer,
)
