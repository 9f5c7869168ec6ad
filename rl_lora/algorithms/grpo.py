"""GRPO through TRL's GRPOTrainer: the recipe -> a GRPOConfig, rewards -> TRL reward functions.

``ALGORITHM`` is GRPO's check -> load -> build (rl_lora/algorithms/contract.py): the check and load are the
rollout algorithms' (common.check_rollout, common.load_rollout), shared with PPO.

With a LoRA spec, TRL wraps the policy with PEFT and the reference is the same network with its
adapter disabled (no second copy); with ``rank: full`` every parameter trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.grpo_trainer import RewardFunc

from rl_lora.adapters.lora import keep_adapters_fp32, peft_config
from rl_lora.adapters.rollout import merged_adapters
from rl_lora.algorithms.common import (
    RolloutInputs,
    TrlTrainerHandle,
    check_rollout,
    check_trl_options,
    load_rollout,
    quiet,
    shared_training_args,
    trl_config,
)
from rl_lora.algorithms.contract import Loaded
from rl_lora.algorithms.ppo.losses import adaptive_kl_coef
from rl_lora.config.schema import GrpoRecipe
from rl_lora.tasks.rewards import trainer_rewards
from rl_lora.training.distributed import gather_container_parameters
from rl_lora.training.nonfinite import NonFiniteGuard


class AdaptiveBeta(TrainerCallback):
    """Hold GRPO's KL to a budget (``grpo.target_kl``, nats per completion) with PPO's proportional controller.

    TRL logs the mean KL per token; times the mean completion length that is the KL per completion, logged as
    ``kl_per_completion`` next to the ``beta`` it was measured at. Must run before the tracker's ``on_log``.
    """

    def __init__(self, trainer: GRPOTrainer, target: float, horizon: int, batch_size: int) -> None:
        self.trainer, self.target, self.horizon, self.batch_size = trainer, target, horizon, batch_size

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs or logs.get("kl") is None:
            return
        per_completion = float(logs["kl"]) * float(logs.get("completions/mean_length") or 1.0)
        logs["kl_per_completion"] = per_completion
        logs["beta"] = self.trainer.beta
        self.trainer.beta = adaptive_kl_coef(self.trainer.beta, per_completion, self.target, self.batch_size,
                                             self.horizon)


class MergedRolloutGRPOTrainer(TrlTrainerHandle, NonFiniteGuard, GRPOTrainer):
    """TRL's GRPOTrainer, generating rollouts with the LoRA adapters folded into the weights.

    Only generation changes; the training forward and backward run the usual unmerged adapters.
    Steps with a non-finite loss or gradient are skipped (rl_lora/training/nonfinite.py).
    """

    merge_rollouts: bool = True

    def reference_model(self) -> nn.Module | None:
        return self.ref_model

    def _generate_single_turn(self, *args: Any, **kwargs: Any) -> Any:
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if not self.merge_rollouts or zero3:
            return super()._generate_single_turn(*args, **kwargs)
        with merged_adapters(self.model):
            return super()._generate_single_turn(*args, **kwargs)


def grpo_args(config: GrpoRecipe, lr: float, output_dir: Path) -> GRPOConfig:
    g = config.grpo
    return trl_config(GRPOConfig, config, dict(
        **shared_training_args(config, lr, output_dir),
        num_generations=g.num_generations,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        beta=g.beta,
        epsilon=g.epsilon,
        loss_type=g.loss_type,
        scale_rewards=g.scale_rewards,
        reward_weights=[f.weight for f in config.reward.functions],
    ))


class Grpo:
    """GRPO's steps (rl_lora/algorithms/contract.py's Algorithm)."""

    name = "grpo"
    final_metrics = {"final_reward": "reward"}

    def check(self, config: GrpoRecipe) -> RolloutInputs:
        checked = check_rollout(config)
        check_trl_options(GRPOConfig, config)
        return checked

    def load(self, config: GrpoRecipe, checked: RolloutInputs, progress: bool) -> Loaded:
        return load_rollout(config, checked, progress, config.grpo.max_completion_length)

    def build(self, config: GrpoRecipe, loaded: Loaded, lr: float, output_dir: Path) -> MergedRolloutGRPOTrainer:
        rewards: list[RewardFunc] = list(trainer_rewards(config.reward.functions))
        trainer = MergedRolloutGRPOTrainer(
            model=loaded.model,
            reward_funcs=rewards,
            args=grpo_args(config, lr, output_dir),
            train_dataset=loaded.train_dataset,
            processing_class=loaded.tokenizer,
            peft_config=peft_config(config.lora, model=loaded.model),
        )
        trainer.merge_rollouts = config.grpo.merge_rollouts
        trainer.max_nonfinite_steps = config.train.max_nonfinite_steps
        if config.grpo.target_kl is not None:  # first, so the tracker records what it adds to the logs
            trainer.callback_handler.callbacks.insert(0, AdaptiveBeta(trainer, config.grpo.target_kl,
                                                                      config.grpo.kl_horizon, config.train.batch_size))
        if config.model.quantization != "none":
            keep_adapters_fp32(trainer.model)
        gather_container_parameters(trainer.model, config.distributed)
        return quiet(trainer)

    def kl_budget(self, config: GrpoRecipe) -> float | None:
        return config.grpo.target_kl


ALGORITHM = Grpo()
