"""Checkpoints for trainers built on transformers' Trainer (GRPO, DPO, reward models).

transformers writes what a resume needs (adapter or model as safetensors, optimizer, scheduler, RNG
states, trainer state with the data position) into ``<run>/trainer/checkpoint-N``; this callback then
seals that folder into ``<run>/checkpoints/step_N`` with rl_lora.training.checkpoint (manifest, fsync, atomic
rename), after checking that no weight is non-finite. Resuming is transformers' own
``train(resume_from_checkpoint=...)`` on the newest sealed folder, which reproduces the
uninterrupted run's metrics bit for bit on CPU (tests/test_resume.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from rl_lora.training.checkpoint import seal
from rl_lora.utils.errors import CheckpointError

# Written by transformers but not needed to resume, and a pickle: never kept in a checkpoint.
_DROP = ("training_args.bin",)


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of trainable parameters holding NaN or inf."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]


class SealCheckpoints(TrainerCallback):
    """Seals each checkpoint transformers writes; refuses to seal non-finite weights."""

    def __init__(self, root: Path, meta: dict[str, Any], keep_last: int | None) -> None:
        self.root = root
        self.meta = meta
        self.keep_last = keep_last

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        assert args.output_dir is not None  # TrainingArguments fills in a default output_dir
        staging = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not staging.is_dir():
            raise CheckpointError(f"transformers wrote no checkpoint at '{staging}'")
        bad = non_finite_parameters(model) if model is not None else []
        if bad:
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(
                f"step {state.global_step}: not saving a checkpoint with non-finite weights ({', '.join(bad[:3])})"
            )
        for name in _DROP:
            (staging / name).unlink(missing_ok=True)
        seal(staging, self.root, state.global_step, self.meta, keep_last=self.keep_last)
