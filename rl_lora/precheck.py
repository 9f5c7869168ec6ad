"""What can be checked of a run in a second or two, before the heavy libraries load.

``rl-lora run`` calls ``precheck`` right after the recipe validates and before it imports the trainers
(torch, transformers, TRL, DeepSpeed take ~10 s to import on 2 cores): the reward and metric plug-ins by
name, the task and its data files, the preference files row by row. The runner checks all of it again
with the model's tokenizer at hand (prompt lengths, chat templates); this pass only makes the common
mistakes fail fast. Nothing is written.
"""

from __future__ import annotations

from rl_lora.config import BUILTIN_PREFERENCES, LEARNED_PREFIX, RecipeConfig


def precheck(config: RecipeConfig) -> None:
    """Raise the first user error (USER_ERRORS) a run of ``config`` would raise on its inputs, loading no model."""
    from rl_lora.rewards import check_keywords, resolve_reward

    if config.algorithm in ("grpo", "ppo"):
        for f in config.reward.functions:
            if not f.name.startswith(LEARNED_PREFIX):  # a learned reward loads a model: left to the runner
                check_keywords(f.name, resolve_reward(f.name), f.kwargs)
    needs_task = config.algorithm in ("grpo", "ppo", "dpo") or config.preferences_source == BUILTIN_PREFERENCES
    if needs_task and config.data.task == "dataset":  # the built-in task has no files; plug-ins run in the runner
        from rl_lora.tasks.registry import make_task

        make_task(config).check()
    if config.algorithm in ("dpo", "reward") and config.preferences_source != BUILTIN_PREFERENCES:
        from rl_lora.tasks.preferences import read_preference_file

        read_preference_file(config.preferences_source, split=config.data.split, subset=config.data.subset)
        if config.algorithm == "reward" and config.data.eval_preferences is not None:
            read_preference_file(config.data.eval_preferences, split=config.data.split, subset=config.data.subset)
