"""The run folder: ``runs/<run-name>/`` with the resolved config, metrics, summary and weights."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from rl_lora.config.schema import RecipeConfig
from rl_lora.utils.errors import CheckpointError


def default_run_name(config: RecipeConfig) -> str:
    rank = "full" if config.lora.is_full else f"r{config.lora.rank}"
    if not config.lora.is_full and config.lora.adapter != "lora":
        rank = f"{config.lora.adapter}-{rank}"
    return f"{config.name}-{rank}-s{config.train.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_output_dir(root: Path) -> None:
    """Refuse an output folder that cannot be made or written: a file in the way, or a read-only ancestor.

    Run before the heavy libraries load (rl_lora/launch/precheck.py); creates nothing.
    """
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise CheckpointError(f"logging.output_dir '{root}': cannot write run folders there ('{existing}' is a "
                              "file, not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"logging.output_dir '{root}': cannot write run folders there (Permission denied: "
                              f"'{existing}' is not writable)")


def create_run_dir(config: RecipeConfig) -> Path:
    """Make a fresh run folder (never reusing an existing one) and check that it is writable.

    Runs before any model loads, so an unwritable ``logging.output_dir`` fails at once; earlier run folders
    beside it are never opened.
    """
    root = Path(config.logging.output_dir)
    name = config.logging.run_name or default_run_name(config)
    path = root / name
    try:
        root.mkdir(parents=True, exist_ok=True)
        suffix = 1
        while path.exists():  # two runs started in the same second, or a reused run_name
            suffix += 1
            path = root / f"{name}-{suffix}"
        path.mkdir()
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        # Name what is in the way: a file where a folder must be says more than "File exists".
        blocker = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), None)
        why = f"'{blocker}' is a file, not a folder" if blocker is not None else (exc.strerror or str(exc))
        raise CheckpointError(f"logging.output_dir '{root}': cannot write run folder '{path.name}' ({why})") from None
    return path


def merge_disjoint(parts: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One mapping from named parts that share no key (e.g. summary.json's: the recipe's figures, the
    tracker's, the guard's); a key two parts both give raises, naming both, instead of one silently winning."""
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for part, values in parts.items():
        for key, value in values.items():
            if key in merged:
                raise ValueError(f"key '{key}' comes from both '{owner[key]}' and '{part}'")
            merged[key], owner[key] = value, part
    return merged


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON so that a reader sees either the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_config(run_dir: Path, resolved: dict[str, Any]) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
