"""The built-in model's names and where its shipped build lies, readable without torch."""

from __future__ import annotations

from pathlib import Path

PREFIX = "builtin:"  # model.policy: builtin:<name>
NAMES = ("arithmetic-tiny",)
SHIPPED_ROOT = Path(__file__).resolve().parent / "builtin_weights"
