"""Helpers for tests (not fixtures): the tiny recipe every training test starts from."""

from __future__ import annotations

from pathlib import Path


def tiny_raw(output_dir: Path, **sections: dict) -> dict:
    """A recipe on a random-init built-in model: 3 GRPO steps, a 20-problem held-out set."""
    raw = {
        "name": "tiny",
        "model": {"policy": "builtin:arithmetic-tiny", "warmup_steps": 0},
        "lora": {"rank": 1},
        "grpo": {"num_generations": 4, "max_completion_length": 4},
        # Rewards with spread inside each group, so advantages (and gradients) are non-zero.
        "reward": {"functions": [{"name": "reward_helpers:digit_ones"}]},
        "data": {"eval_size": 20},
        "train": {"steps": 3, "batch_size": 16, "lr": 1e-3, "eval_every": 2},
        "logging": {"output_dir": str(output_dir), "wandb": False, "progress": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw
