"""Security defaults (shared/RELIABILITY.md): no secret from the environment lands in a run folder.

A W&B key and a hub token are set in the environment of a tiny run that logs to W&B (offline); no file
the run writes, W&B's own offline files included, may contain either value.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rl_lora.config.schema import validate
from rl_lora.launch.runner import run_recipe
from tests_support import tiny_raw

SECRETS = {"WANDB_API_KEY": "wandb-key-0123456789abcdef0123456789abcdef01234567", "HF_TOKEN": "hf_SecretToken987"}


def test_no_secret_is_written_to_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    threads = torch.get_num_threads()
    try:
        result = run_recipe(validate(tiny_raw(tmp_path / "runs", train={"steps": 2, "threads": 1},
                                              logging={"wandb": True})))
    finally:
        torch.set_num_threads(threads)
    files = [p for p in result.run_dir.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files), "the run wrote no W&B files: the test would prove nothing"
    leaked = [(str(p.relative_to(result.run_dir)), name) for p in files for name, value in SECRETS.items()
              if value.encode() in p.read_bytes()]
    assert not leaked, f"secrets written to the run folder: {leaked}"
    # Weights are safetensors; nothing pickled is kept.
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
