"""Shared set-up: an isolated model cache and offline W&B (the tiny recipe is in tests_support.py)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Built-in models go to a per-session folder, never the user's ~/.cache."""
    os.environ["RL_LORA_CACHE"] = str(tmp_path_factory.mktemp("rl-lora-cache"))
