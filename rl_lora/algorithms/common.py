"""What the algorithms share: TRL's settings, the TrainerHandle of a TRL trainer, and the task-and-rewards
check and load of the rollout algorithms (GRPO, PPO). The contract itself is rl_lora/algorithms/contract.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from rl_lora.algorithms.contract import Loaded, parameter_figures
from rl_lora.config.schema import DpoRecipe, GrpoRecipe, PpoRecipe, RecipeConfig, RewardRecipe
from rl_lora.config.trl_options import check_builder_options, check_trl_keys
from rl_lora.models.loading import load_policy
from rl_lora.tasks.registry import make_task
from rl_lora.training.distributed import deepspeed_config, is_main, per_device_batch


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
        "ddp_timeout": config.distributed.timeout,  # a stalled process fails the run instead of hanging it
        "max_steps": t.steps,
        "seed": t.seed,
        "logging_steps": t.log_every,
        "report_to": "none",
        # Checkpoints: transformers writes them into output_dir, rl_lora.training.sealing seals them.
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


TrlRecipe = GrpoRecipe | DpoRecipe | RewardRecipe  # the recipes with a ``trl:`` section (PPO is rl-lora's own)


def trl_config(config_cls: type, config: TrlRecipe, ours: dict[str, Any]) -> Any:
    """``config_cls(**ours, **config.trl)``: the recipe's ``trl`` options on top of what rl-lora sets, after
    checking each is a field of ``config_cls`` and not one rl-lora sets from the recipe (ConfigError)."""
    check_trl_options(config_cls, config)
    check_builder_options(ours, f"{config_cls.__name__}'s builder")  # a trl: key can override only TRL_DEFAULTS
    return config_cls(**{**ours, **config.trl})  # e.g. gradient_checkpointing: rl-lora's default, the user's choice


def check_trl_options(config_cls: type, config: TrlRecipe) -> None:
    import dataclasses

    check_trl_keys(config, frozenset(f.name for f in dataclasses.fields(config_cls)), config_cls.__name__)


def checked_task(config: RecipeConfig) -> tuple[Any, dict[str, Any]]:
    """The recipe's task (rl_lora/tasks/registry.py), its own checks run: (task, figures for summary.json)."""
    task = make_task(config)
    check = getattr(task, "check", None)
    return task, (check() or {}) if check is not None else {}


class TrlTrainerHandle:
    """The TrainerHandle (rl_lora/algorithms/contract.py) of a transformers Trainer subclass, mixed in first."""

    if TYPE_CHECKING:  # what the mixin uses of the transformers Trainer it is mixed into
        # transformers types it ``PreTrainedModel | nn.Module | None`` (invariant: a mixin cannot narrow it),
        # though a built trainer always holds its policy (PEFT's wrapper for an adapter run).
        model: Any
        state: TrainerState
        is_deepspeed_enabled: bool

        def add_callback(self, callback: TrainerCallback | type[TrainerCallback]) -> None: ...

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None: ...

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None: ...

        def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
                  ignore_keys_for_eval: list[str] | None = None) -> Any: ...

    def reference_model(self) -> nn.Module | None:
        """The separate frozen reference, if the trainer holds one (DPO and GRPO's ``ref_model``)."""
        return None

    @property
    def global_step(self) -> int:
        return self.state.global_step

    def attach(self, callbacks: list[TrainerCallback]) -> None:
        for callback in callbacks:
            self.add_callback(callback)

    def figures(self) -> dict[str, int | float]:
        return parameter_figures(self, self.reference_model())

    def save_policy(self, folder: Path) -> None:
        if self.is_deepspeed_enabled:
            self.save_model(str(folder))
            if is_main():
                (folder / "training_args.bin").unlink(missing_ok=True)  # a pickle; not needed to load the weights
        else:
            self.model.save_pretrained(str(folder))

    def restore(self, checkpoint: Path, step: int) -> None:
        self._load_from_checkpoint(str(checkpoint))
        self.state.global_step = step


RolloutInputs = tuple[Any, dict[str, Any]]  # (the task, its figures for summary.json)


def check_rollout(config: GrpoRecipe | PpoRecipe) -> RolloutInputs:
    """GRPO's and PPO's check: the recipe's rewards (names, keywords, reward-model folders, the columns they
    need from the task's data) and the task."""
    from rl_lora.tasks.rewards import check_columns, check_reward, resolve_reward

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


def load_rollout(config: GrpoRecipe | PpoRecipe, checked: RolloutInputs, progress: bool,
                 completion_tokens: int) -> Loaded:
    """GRPO's and PPO's load: the policy, the task's prompts, and the held-out evaluation at the algorithm's
    completion length."""
    task, info = checked
    model, tokenizer, source = load_policy(config.model, config.data, progress=progress)

    def evaluate(m: Any) -> dict[str, float]:
        return task.evaluate(m, tokenizer, completion_tokens)

    return Loaded(model, tokenizer, source, task.train_dataset(tokenizer), evaluate, task.metric, info)
