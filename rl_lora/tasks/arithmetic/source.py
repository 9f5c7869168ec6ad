"""The built-in model as a policy source: ``model.policy: builtin:arithmetic-tiny``.

Light at import (no torch): rl_lora/models/policies.py finds it by module path, and the checks that run
before the heavy libraries load read its shipped tokenizer files through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rl_lora.config.schema import DataSpec, ModelSpec
from rl_lora.tasks.arithmetic.shipped import NAMES, SHIPPED_ROOT

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase


class BuiltinSource:
    """The tiny Llama of the built-in arithmetic task (rl_lora/tasks/arithmetic/model.py)."""

    names = NAMES
    caches_pairs = True

    def folder(self, name: str, spec: ModelSpec, data: DataSpec, progress: bool) -> Path:
        from rl_lora.tasks.arithmetic.model import builtin_path

        # The built-in model is warmed up on the arithmetic task; on any other task it is that task's
        # default build (the recipe's data section describes the other task, not the warm-up).
        warmup_data = data if data.task == "arithmetic" else DataSpec()
        return builtin_path(name, spec.warmup_steps, warmup_data, progress=progress)

    def config(self, name: str) -> PretrainedConfig:
        from rl_lora.tasks.arithmetic.model import builtin_config

        # Its shapes do not depend on the warm-up, so the model need not be built to be measured.
        return builtin_config()

    def tokenizer(self, name: str) -> PreTrainedTokenizerBase:
        from rl_lora.tasks.arithmetic.tokenizer import build_char_tokenizer

        return build_char_tokenizer()

    def tokenizer_folder(self, name: str) -> Path | None:
        return SHIPPED_ROOT / name  # every build of the model shares the shipped build's tokenizer


def source() -> BuiltinSource:
    return BuiltinSource()
