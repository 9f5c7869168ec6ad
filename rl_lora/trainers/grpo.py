"""GRPO through TRL's GRPOTrainer: the recipe -> a GRPOConfig, rewards -> TRL reward functions.

With a LoRA spec, TRL wraps the policy with PEFT and the reference is the same network with its
adapter disabled (no second copy); with ``rank: full`` every parameter trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import GRPOConfig, GRPOTrainer

from reward_models.adapters import trainer_rewards
from rl_lora.config import RecipeConfig
from rl_lora.lora import keep_adapters_fp32, peft_config
from rl_lora.rollout import merged_adapters
from rl_lora.trainers.common import shared_training_args
from rl_lora.trainers.nonfinite import NonFiniteGuard


class MergedRolloutGRPOTrainer(NonFiniteGuard, GRPOTrainer):
    """TRL's GRPOTrainer, generating rollouts with the LoRA adapters folded into the weights.

    Only generation changes; the training forward and backward run the usual unmerged adapters.
    Steps with a non-finite loss or gradient are skipped (rl_lora/trainers/nonfinite.py).
    """

    merge_rollouts: bool = True

    def _generate_single_turn(self, *args: Any, **kwargs: Any) -> Any:
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if not self.merge_rollouts or zero3:
            return super()._generate_single_turn(*args, **kwargs)
        with merged_adapters(self.model):
            return super()._generate_single_turn(*args, **kwargs)


def grpo_args(config: RecipeConfig, lr: float, output_dir: Path) -> GRPOConfig:
    g = config.grpo
    return GRPOConfig(
        **shared_training_args(config, lr, output_dir),
        num_generations=g.num_generations,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        beta=g.beta,
        epsilon=g.epsilon,
        loss_type=g.loss_type,
        scale_rewards=g.scale_rewards,
        reward_weights=[f.weight for f in config.reward.functions],
    )


def build_grpo_trainer(
    config: RecipeConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Dataset,
    lr: float,
    output_dir: Path,
    callbacks: list[TrainerCallback],
) -> GRPOTrainer:
    rewards = trainer_rewards(config.reward.functions)
    trainer = MergedRolloutGRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=grpo_args(config, lr, output_dir),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config(config.lora, model=model),
        callbacks=callbacks,
    )
    trainer.merge_rollouts = config.grpo.merge_rollouts
    trainer.max_nonfinite_steps = config.train.max_nonfinite_steps
    if config.model.quantization != "none":
        keep_adapters_fp32(trainer.model)
    # Our tracker draws the progress bar and writes the records; transformers' printers would
    # print every log dict to the console as well.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer
