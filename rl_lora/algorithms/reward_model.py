"""Reward-model training through TRL's RewardTrainer: preference pairs -> a scalar scorer.

The reward model is the policy's architecture with a one-logit classification head
(``AutoModelForSequenceClassification``, ``num_labels=1``), initialised from the policy's weights;
only the head (``score``) starts fresh, seeded by ``train.seed``. With LoRA, PEFT trains the adapters
and the whole head (``modules_to_save``); ``lora.rank: full`` trains everything. The loss is TRL's
Bradley-Terry ``-log sigmoid(r_chosen - r_rejected)``.

The held-out metric is pairwise accuracy: the fraction of held-out pairs whose chosen side scores
strictly higher, scored exactly as a recipe's ``learned:<folder>`` reward will score texts later
(reward_models/learned.py).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedModel, set_seed
from trl import RewardConfig, RewardTrainer

from reward_models.learned import score_texts
from rl_lora.adapters.lora import peft_config
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
    check_chat_template,
    policy_pairs,
    read_split_preferences,
    require_task_pairs,
)
from rl_lora.config.schema import BUILTIN_PREFERENCES, RewardRecipe
from rl_lora.models.loading import load_policy, load_reward_backbone, load_tokenizer, resolve_policy_path
from rl_lora.tasks.base import RATE, Metric
from rl_lora.training.distributed import gather_container_parameters
from rl_lora.training.nonfinite import NonFiniteGuard

CALIBRATION_BINS = 10
PAIRWISE_ACCURACY = Metric("pairwise_accuracy", True,
                           "pairwise accuracy on held-out preference pairs (chosen scored above rejected)", unit=RATE)
# The other held-out figures: in [0, 1] or centred on 0, but not rates (their changes read in their own units).
CALIBRATION_ERROR = Metric("calibration_error", False,
                           "expected calibration error of sigmoid(margin) on held-out pairs", unit="ECE")
MEAN_MARGIN = Metric("mean_margin", True, "mean reward margin (chosen - rejected) on held-out pairs", unit="logits")

Pairs = list[dict[str, Any]]
Checked = tuple[Any, tuple[Pairs, Pairs] | None]


class GuardedRewardTrainer(TrlTrainerHandle, NonFiniteGuard, RewardTrainer):
    """TRL's RewardTrainer, skipping steps with a non-finite loss or gradient (rl_lora/training/nonfinite.py)."""


def check_preferences(config: RewardRecipe) -> Checked:
    """(the task, the (training, held-out) rows of the recipe's preference sources, or None for the task's
    own pairs). The task is needed only for its own pairs."""
    source = config.preferences_source
    if source == BUILTIN_PREFERENCES:
        task, _ = checked_task(config)
        require_task_pairs(task, config)
        checked: Checked = (task, None)
    else:
        checked = (None, read_split_preferences(config, source))
    check_trl_options(RewardConfig, config)
    return checked


def pairwise_margins(model: PreTrainedModel, tokenizer: Any, pairs: Pairs, batch_size: int = 256) -> list[float]:
    """Score(chosen) - score(rejected) per pair, scored as a ``learned:`` reward scores texts."""
    prompts = [p.get("prompt", [] if isinstance(p["chosen"], list) else "") for p in pairs]
    chosen = score_texts(model, tokenizer, prompts, [p["chosen"] for p in pairs], batch_size)
    rejected = score_texts(model, tokenizer, prompts, [p["rejected"] for p in pairs], batch_size)
    return [c - r for c, r in zip(chosen, rejected, strict=True)]


def pairwise_accuracy(model: PreTrainedModel, tokenizer: Any, pairs: Pairs, batch_size: int = 256) -> float:
    """Fraction of pairs whose chosen side scores strictly higher than its rejected side (ties count wrong)."""
    if not pairs:
        return float("nan")
    return sum(m > 0 for m in pairwise_margins(model, tokenizer, pairs, batch_size)) / len(pairs)


def calibration_error(margins: list[float], bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error of the Bradley-Terry probabilities sigmoid(margin) on held-out pairs.

    Each pair's prediction is the more likely side, with confidence max(p, 1 - p); the error is the
    pair-weighted mean |accuracy - confidence| over equal-width confidence bins. 0 means the reward model's
    score differences mean what the Bradley-Terry model says they mean; large values mean its confidence
    (and so the scale of the rewards a policy sees) is off.
    """
    if not margins:
        return float("nan")
    binned: list[list[tuple[float, bool]]] = [[] for _ in range(bins)]
    for m in margins:
        p = 1.0 / (1.0 + math.exp(-m)) if m > -700 else 0.0
        confidence = max(p, 1.0 - p)
        binned[min(int((confidence - 0.5) * 2 * bins), bins - 1)].append((confidence, m > 0))
    return sum(abs(sum(ok for _, ok in b) / len(b) - sum(c for c, _ in b) / len(b)) * len(b)
               for b in binned if b) / len(margins)


def load(config: RewardRecipe, checked: Checked, progress: bool) -> Loaded:
    task, pairs = checked
    if pairs is None:  # the task's own pairs: the causal policy's own wrong samples are the rejected answers
        policy, tokenizer, source = load_policy(config.model, config.data, progress=progress)
        train_pairs, held_pairs = policy_pairs(task, config, policy, tokenizer, source)
        del policy
    else:
        source = resolve_policy_path(config.model, config.data, progress)
        tokenizer = load_tokenizer(config.model, source)
        train_pairs, held_pairs = pairs
    check_chat_template(train_pairs, tokenizer, source, config.preferences_source)
    set_seed(config.train.seed)  # the new head's initialisation
    model = load_reward_backbone(config.model, source, tokenizer.pad_token_id)

    def evaluate(m: Any) -> dict[str, float]:
        margins = pairwise_margins(m, tokenizer, held_pairs) if held_pairs else []
        accuracy = sum(x > 0 for x in margins) / len(margins) if margins else float("nan")
        return {PAIRWISE_ACCURACY.name: accuracy, CALIBRATION_ERROR.name: calibration_error(margins),
                MEAN_MARGIN.name: sum(margins) / len(margins) if margins else float("nan")}

    info = {"train_pairs": len(train_pairs), "held_out_pairs": len(held_pairs)}
    metric = replace(PAIRWISE_ACCURACY, resolution=1 / len(held_pairs)) if held_pairs else PAIRWISE_ACCURACY
    return Loaded(model, tokenizer, source, Dataset.from_list(train_pairs), evaluate, metric, info)


def reward_args(config: RewardRecipe, lr: float, output_dir: Path) -> RewardConfig:
    r = config.reward_model
    return trl_config(RewardConfig, config, dict(
        **shared_training_args(config, lr, output_dir),
        max_length=r.max_length,
        center_rewards_coefficient=r.center_rewards_coefficient,
    ))


def build_reward_trainer(config: RewardRecipe, loaded: Loaded, lr: float, output_dir: Path) -> GuardedRewardTrainer:
    trainer = GuardedRewardTrainer(
        model=loaded.model,
        args=reward_args(config, lr, output_dir),
        train_dataset=loaded.train_dataset,
        processing_class=loaded.tokenizer,
        peft_config=peft_config(config.lora, task_type="SEQ_CLS", model=loaded.model),
    )
    trainer.max_nonfinite_steps = config.train.max_nonfinite_steps
    trainer.add_callback(RestoreTokenCount(trainer))
    gather_container_parameters(trainer.model, config.distributed)
    return quiet(trainer)


ALGORITHM = PairwiseAlgorithm(
    "reward", {"final_train_accuracy": "accuracy", "final_margin": "margin"},
    check_preferences, load, build_reward_trainer,
)
