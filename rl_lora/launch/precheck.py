"""What can be checked of a run in a second or two, before the heavy libraries load.

``rl-lora run`` and ``rl-lora validate`` call ``precheck`` right after the recipe validates (``run`` before it
imports the trainers: torch, transformers, TRL, DeepSpeed take ~10 s to import on 2 cores): the reward and
metric plug-ins by name, the task and its data files, the preference files row by row, the ``trl:`` options (read from
TRL's source). The runner checks all of it again with the model's tokenizer at hand (prompt lengths, chat
templates); this pass only makes the common mistakes fail fast. Nothing is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

from rl_lora.config.algorithms import algorithm_info
from rl_lora.config.schema import BUILTIN_PREFERENCES, LEARNED_PREFIX, RecipeConfig

if TYPE_CHECKING:
    from rl_lora.config.schema import DpoRecipe, GrpoRecipe, PpoRecipe, RewardRecipe
    from rl_lora.data.preferences import RowCheck


def precheck(config: RecipeConfig) -> None:
    """Raise the first user error (USER_ERRORS) a run of ``config`` would raise on its inputs, loading no model."""
    from rl_lora.config.trl_options import precheck_trl
    from rl_lora.tasks.rewards import check_keywords, resolve_reward

    precheck_trl(config)
    from rl_lora.training.run_dir import check_output_dir

    check_output_dir(Path(config.logging.output_dir))
    info = algorithm_info(config.algorithm)
    if info.uses_rewards:  # the recipe has a reward: section
        for f in cast("GrpoRecipe | PpoRecipe", config).reward.functions:
            if not f.name.startswith(LEARNED_PREFIX):  # a learned reward loads a model: left to the runner
                check_keywords(f.name, resolve_reward(f.name), f.kwargs)
    # Every algorithm but the reward model evaluates on a task; the reward model only when it trains on its pairs.
    preferences = cast("DpoRecipe | RewardRecipe", config).preferences_source if info.uses_preferences else None
    needs_task = not info.scores_sequences or preferences == BUILTIN_PREFERENCES
    if needs_task and config.data.task == "dataset":  # the built-in task has no files; plug-ins run in the runner
        from rl_lora.tasks.registry import make_task

        make_task(config).check()
    if preferences is not None and preferences != BUILTIN_PREFERENCES:
        from rl_lora.data.chat import refuse_if_files_lack_chat_template
        from rl_lora.data.preferences import is_conversational, read_preference_file

        sources = [preferences]
        held = getattr(config.data, "eval_preferences", None)  # DPO's and the reward model's data (PreferenceDataSpec)
        if held is not None:
            sources.append(held)
        for i, source in enumerate(sources):
            rows = read_preference_file(source, light_prompt_limit(config) if i == 0 else None, config.data.split,
                                        config.data.subset)
            if is_conversational(rows):  # refused here, not after the heavy imports
                refuse_if_files_lack_chat_template(config.model, source)


def light_prompt_limit(config: RecipeConfig) -> RowCheck | None:
    """The preference prompt-length check with a token counter read by ``tokenizers`` alone (no transformers),
    for policies whose folder has a tokenizer.json; None otherwise (the runner checks with the full tokenizer)."""
    from rl_lora.data.preferences import prompt_limit_check
    from rl_lora.models.tokenizer_files import light_tokenizer_and_context

    return prompt_limit_check(config, light_tokenizer_and_context(config.model))
