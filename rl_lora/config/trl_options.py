"""A recipe's ``trl:`` options: checked against TRL's config class of the algorithm before TRL loads, and
against the options rl-lora sets itself.

``rl-lora run`` checks a recipe's ``trl:`` section before the heavy libraries load (rl_lora/launch/precheck.py):
importing TRL takes ~10 s on 2 cores, so the names come from a snapshot of the classes' dataclass fields
(rl_lora/config/option_snapshot.py). Where the installed versions are not the snapshot's, the check waits
for the real import in the trainer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from rl_lora.config.algorithms import ALGORITHMS
from rl_lora.config.option_snapshot import option_names as snapshot_option_names
from rl_lora.utils.errors import ConfigError

if TYPE_CHECKING:
    from rl_lora.config.schema import DpoRecipe, GrpoRecipe, RecipeConfig, RewardRecipe

# The TRL config class of each algorithm that has one.
TRL_CLASSES = {name: info.trl_config for name, info in ALGORITHMS.items() if info.trl_config}


def option_names(class_name: str) -> frozenset[str] | None:
    """The options of TRL's ``class_name`` (its fields and its bases'), or None where the installed TRL or
    transformers is not the snapshot's (rl_lora/config/option_snapshot.py)."""
    return snapshot_option_names("trl", class_name)


def check_trl_keys(config: GrpoRecipe | DpoRecipe | RewardRecipe, names: frozenset[str], class_name: str) -> None:
    """Refuse a ``trl:`` key that is not an option of TRL's ``class_name`` (with the nearest one) or that rl-lora
    sets from the recipe itself (naming the recipe key to set instead)."""
    import difflib

    for key in config.trl:
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
            hint = f"; did you mean 'trl.{close[0]}'?" if close else ""
            raise ConfigError(f"trl.{key}: not an option of TRL's {class_name}{hint}")
        if key in RECIPE_OWNED:
            raise ConfigError(f"trl.{key}: rl-lora sets it from the recipe's {RECIPE_OWNED[key]}: set that instead")


def precheck_trl(config: RecipeConfig) -> None:
    """The ``trl:`` check from the source of TRL's config class, before TRL is imported (no-op where unreadable)."""
    class_name = TRL_CLASSES.get(config.algorithm)
    if class_name is None:  # PPO is rl-lora's own trainer: its recipe has no trl section
        return
    config = cast("GrpoRecipe | DpoRecipe | RewardRecipe", config)  # the algorithms with a TRL class have one
    if not config.trl:
        return
    names = option_names(class_name)
    if names is not None:
        check_trl_keys(config, names, class_name)


# TRL options rl-lora sets from recipe keys (shared_training_args and the algorithms' own sections).
RECIPE_OWNED = {
    "output_dir": "logging.output_dir", "learning_rate": "train.lr", "lr_scheduler_type": "train.lr_scheduler",
    "warmup_steps": "train.warmup_ratio", "weight_decay": "train.weight_decay", "max_grad_norm": "train.max_grad_norm",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "distributed.gradient_accumulation",
    "deepspeed": "distributed.*", "ddp_timeout": "distributed.timeout", "max_steps": "train.steps",
    "seed": "train.seed", "logging_steps": "train.log_every",
    "save_strategy": "train.save_every", "save_steps": "train.save_every", "report_to": "logging.wandb",
    "num_generations": "grpo.num_generations", "max_completion_length": "grpo.max_completion_length",
    "temperature": "grpo.temperature", "beta": "grpo.beta / dpo.beta", "epsilon": "grpo.epsilon",
    "loss_type": "grpo.loss_type / dpo.loss_type", "scale_rewards": "grpo.scale_rewards",
    "reward_weights": "reward.functions[].weight", "loss_weights": "dpo.loss_weights",
    "max_length": "dpo.max_length / reward_model.max_length",
    "center_rewards_coefficient": "reward_model.center_rewards_coefficient", "use_cpu": "the machine",
    "bf16": "model.dtype (bf16 autocast on a GPU only)", "disable_tqdm": "logging.progress",
    "dataloader_num_workers": "data (held in memory: 0 workers)",
}
# Options the trainer builders (rl_lora/algorithms/) set as defaults that a recipe's ``trl:`` may change. Every
# other option a builder sets must be in RECIPE_OWNED: ``check_builder_options`` holds the builders to this.
TRL_DEFAULTS = frozenset({"gradient_checkpointing"})


def check_builder_options(ours: Iterable[str], builder: str) -> None:
    """An option a trainer builder sets that neither RECIPE_OWNED nor TRL_DEFAULTS lists: a ``trl:`` key could
    silently override it, so the builder is refused (a bug of rl-lora's, caught by its tests)."""
    unlisted = sorted(set(ours) - set(RECIPE_OWNED) - TRL_DEFAULTS)
    if unlisted:
        raise RuntimeError(f"{builder} sets TRL options {unlisted} that rl_lora/config/trl_options.py's RECIPE_OWNED "
                           "does not list: add them there (or to TRL_DEFAULTS if trl: may change them)")
