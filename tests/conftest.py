"""Shared set-up: an isolated model cache and offline W&B (the tiny recipe is in tests_support.py)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Tests never use the hub; a hub name fails at once instead of after ~25 s of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Built-in models go to a per-session folder, never the user's ~/.cache."""
    os.environ["RL_LORA_CACHE"] = str(tmp_path_factory.mktemp("rl-lora-cache"))
