"""What every algorithm hands the runner, and the TRL settings they share.

An algorithm is three steps, so the runner can read top to bottom (setup -> train -> save -> summary)
whatever it runs:

1. ``check(config)``: everything that can fail on the user's input without a model (reward names,
   preference files), run before any model loads and before the run folder exists;
2. ``load(config, checked, progress)``: the model, tokenizer, training data and held-out evaluation;
3. ``build(config, loaded, lr, output_dir, callbacks)``: the trainer, with our tracker as a callback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from rl_lora.config import RecipeConfig
from rl_lora.distributed import deepspeed_config, per_device_batch
from rl_lora.errors import ConfigError
from rl_lora.models.loading import load_policy
from rl_lora.tasks.base import Metric
from rl_lora.tasks.registry import make_task


@dataclass
class Loaded:
    """A model ready to train: what ``build`` needs and what the tracker evaluates."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # the folder or hub id the weights came from (the built-in model's cache folder)
    train_dataset: Dataset
    evaluate: Callable[[Any], dict[str, float]]  # held-out metrics of a model, e.g. {"accuracy": 0.46}
    metric: Metric  # the headline one of them: reports, sweeps and the closing lines judge by it
    info: dict[str, Any] = field(default_factory=dict)  # figures for summary.json (e.g. pair counts)


@dataclass(frozen=True)
class Algorithm:
    check: Callable[[RecipeConfig], Any]
    load: Callable[[RecipeConfig, Any, bool], Loaded]
    build: Callable[[RecipeConfig, Loaded, float, Path, list[TrainerCallback]], Any]
    # summary.json key -> logged key, averaged over the last logged steps (one step is noisy)
    final_metrics: dict[str, str] = field(default_factory=dict)


def shared_training_args(config: RecipeConfig, lr: float, output_dir: Path) -> dict[str, Any]:
    """TrainingArguments every TRL trainer here gets: CPU-safe precision, our LR and schedule, checkpoints."""
    on_gpu = torch.cuda.is_available()
    t = config.train
    return {
        "output_dir": str(output_dir),
        "use_cpu": not on_gpu,
        # bf16 autocast only on a GPU: on CPU it is refused, and a bf16 base ran ~19x slower.
        "bf16": on_gpu and config.model.dtype == "bfloat16",
        "gradient_checkpointing": False,
        "learning_rate": lr,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": int(t.warmup_ratio * t.steps),
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        # train.batch_size is the global batch of one optimizer step, whatever the number of processes.
        "per_device_train_batch_size": per_device_batch(t.batch_size, config.distributed.gradient_accumulation),
        "gradient_accumulation_steps": config.distributed.gradient_accumulation,
        "deepspeed": deepspeed_config(config.distributed),
        "max_steps": t.steps,
        "seed": t.seed,
        "logging_steps": t.log_every,
        "report_to": "none",
        # Checkpoints: transformers writes them into output_dir, rl_lora.trainers.checkpointing seals them.
        # The final weights the runner saves itself (safetensors only).
        "save_strategy": "steps" if t.save_every else "no",
        **({"save_steps": t.save_every} if t.save_every else {}),
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


class RestoreTokenCount(TrainerCallback):
    """Carry TRL's trained-token count (logged as ``num_tokens``) across a resume.

    TRL 1.16's DPO and reward trainers keep that count in memory only (``_total_train_tokens``), so a resumed
    run would start it again at 0; the checkpoint's log history holds the count at its last record.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        counts = [r["num_tokens"] for r in state.log_history if r.get("num_tokens") is not None]
        if counts and hasattr(self.trainer, "_total_train_tokens"):
            self.trainer._total_train_tokens = int(counts[-1])


def quiet(trainer: Any) -> Any:
    """Our tracker draws the progress bar and writes the records; transformers' printers would print
    every log dict to the console as well."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def trl_config(config_cls: type, config: RecipeConfig, ours: dict[str, Any]) -> Any:
    """``config_cls(**ours, **config.trl)``: the recipe's ``trl`` options on top of what rl-lora sets, after
    checking each is a field of ``config_cls`` and not one rl-lora sets from the recipe (ConfigError)."""
    check_trl_options(config_cls, config)
    return config_cls(**{**ours, **config.trl})  # e.g. gradient_checkpointing: rl-lora's default, the user's choice


def check_trl_options(config_cls: type, config: RecipeConfig) -> None:
    import dataclasses
    import difflib

    names = {f.name for f in dataclasses.fields(config_cls)}
    for key in config.trl:
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
            hint = f"; did you mean 'trl.{close[0]}'?" if close else ""
            raise ConfigError(f"trl.{key}: not an option of TRL's {config_cls.__name__}{hint}")
        if key in RECIPE_OWNED:
            raise ConfigError(f"trl.{key}: rl-lora sets it from the recipe's {RECIPE_OWNED[key]}: set that instead")


# TRL options rl-lora sets from recipe keys (shared_training_args and the algorithms' own sections).
RECIPE_OWNED = {
    "output_dir": "logging.output_dir", "learning_rate": "train.lr", "lr_scheduler_type": "train.lr_scheduler",
    "warmup_steps": "train.warmup_ratio", "weight_decay": "train.weight_decay", "max_grad_norm": "train.max_grad_norm",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "distributed.gradient_accumulation",
    "deepspeed": "distributed.*", "max_steps": "train.steps", "seed": "train.seed", "logging_steps": "train.log_every",
    "save_strategy": "train.save_every", "save_steps": "train.save_every", "report_to": "logging.wandb",
    "num_generations": "grpo.num_generations", "max_completion_length": "grpo.max_completion_length",
    "temperature": "grpo.temperature", "beta": "grpo.beta / dpo.beta", "epsilon": "grpo.epsilon",
    "loss_type": "grpo.loss_type / dpo.loss_type", "scale_rewards": "grpo.scale_rewards",
    "reward_weights": "reward.functions[].weight", "loss_weights": "dpo.loss_weights",
    "max_length": "dpo.max_length / reward_model.max_length",
    "center_rewards_coefficient": "reward_model.center_rewards_coefficient", "use_cpu": "the machine",
}


def checked_task(config: RecipeConfig) -> tuple[Any, dict[str, Any]]:
    """The recipe's task (rl_lora/tasks/registry.py), its own checks run: (task, figures for summary.json)."""
    task = make_task(config)
    check = getattr(task, "check", None)
    return task, (check() or {}) if check is not None else {}


def rollout_algorithm(
    build: Callable[..., Any], completion_tokens: Callable[[RecipeConfig], int]
) -> Algorithm:
    """An RL algorithm that samples completions of the task's prompts and scores them with the recipe's
    rewards (GRPO; PPO has the same shape). ``build`` has build_grpo_trainer's signature."""

    def check(config: RecipeConfig) -> tuple[Any, dict[str, Any]]:
        from rl_lora.rewards import check_columns, check_reward, resolve_reward

        for f in config.reward.functions:  # a bad name, keyword or reward-model folder fails here
            check_reward(f.name, f.kwargs)
        task, info = checked_task(config)
        columns = getattr(task, "columns", None)
        if columns is not None:  # a reward needing a column the task's data lacks fails here too
            for f in config.reward.functions:
                if not f.name.startswith("learned:"):
                    check_columns(f"reward '{f.name}'", resolve_reward(f.name), f.kwargs, list(columns),
                                  config.data.source or config.data.task)
        return task, info

    def load(config: RecipeConfig, checked: tuple[Any, dict[str, Any]], progress: bool) -> Loaded:
        task, info = checked
        model, tokenizer, source = load_policy(config.model, config.data, progress=progress)
        max_new = completion_tokens(config)

        def evaluate(m: Any) -> dict[str, float]:
            return task.evaluate(m, tokenizer, max_new)

        return Loaded(model, tokenizer, source, task.train_dataset(tokenizer), evaluate, task.metric, info)

    def build_trainer(config: RecipeConfig, loaded: Loaded, lr: float, output_dir: Path,
                      callbacks: list[TrainerCallback]) -> Any:
        return build(config, loaded.model, loaded.tokenizer, loaded.train_dataset, lr, output_dir, callbacks)

    return Algorithm(check, load, build_trainer, final_metrics={"final_reward": "reward"})
