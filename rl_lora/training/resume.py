"""Resuming a run: which folder, which checkpoint, and whether the recipe still fits it.

A run resumes in its own folder from the newest sealed checkpoint (rl_lora/training/checkpoint.py). The
records of ``metrics.jsonl`` past that checkpoint's step were written by the interrupted process
after its last save; they are dropped, and the resumed process writes those steps again, so the
file ends as the uninterrupted run's would.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from rl_lora.config.schema import RecipeConfig
from rl_lora.training import checkpoint
from rl_lora.utils.errors import CheckpointError, ConfigError

# Changing any of these makes the saved weights and optimizer state meaningless for the new recipe.
MUST_MATCH = ("algorithm", "model.policy", "model.warmup_steps", "model.dtype", "lora.rank", "lora.alpha",
              "lora.targets", "lora.adapter", "lora.adapter_options", "train.batch_size", "train.seed")
# Keys a run folder written before they existed lacks: it ran with these values.
ABSENT_MEANS = {"lora.adapter": "lora", "lora.adapter_options": {}}


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def config_hash(config: RecipeConfig) -> str:
    """Hash of the recipe fields a checkpoint depends on (logging and run length excluded)."""
    raw = config.to_dict()
    return hashlib.sha256(json.dumps({k: _get(raw, k) for k in MUST_MATCH}, sort_keys=True).encode()).hexdigest()[:16]


def find_run_dir(config: RecipeConfig, given: str | None) -> Path:
    """The folder named by ``--resume``, or the newest run of this recipe that has a checkpoint."""
    if given:
        path = Path(given)
        if not path.is_dir():
            raise CheckpointError(f"--resume: run folder '{path}' does not exist")
        return path
    root = Path(config.logging.output_dir)
    prefix = config.logging.run_name or f"{config.name}-"
    candidates = [p for p in root.glob(f"{prefix}*") if checkpoint.latest(p / "checkpoints") is not None]
    if not candidates:
        raise CheckpointError(f"--resume: no run of '{config.name}' under '{root}' has a complete checkpoint")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def check_compatible(run_dir: Path, config: RecipeConfig) -> None:
    """Refuse, naming the key, when the recipe changed in a way the checkpoint cannot follow."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise CheckpointError(f"cannot resume '{run_dir}': it has no config.yaml")
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    now = config.to_dict()
    before = {k: ABSENT_MEANS.get(k) if _get(saved, k) is None else _get(saved, k) for k in MUST_MATCH}
    changed = [f"{k} was {before[k]!r}, now {_get(now, k)!r}" for k in MUST_MATCH if before[k] != _get(now, k)]
    if changed:
        raise ConfigError(f"cannot resume '{run_dir}': the recipe changed ({'; '.join(changed)})")


def latest_checkpoint(run_dir: Path) -> Path:
    found = checkpoint.latest(run_dir / "checkpoints")
    if found is None:
        raise CheckpointError(f"cannot resume '{run_dir}': no complete checkpoint in '{run_dir / 'checkpoints'}'")
    return found


def truncate_metrics(path: Path, step: int, rewrite: bool = True) -> list[dict[str, Any]]:
    """The records up to ``step``; with ``rewrite`` the file is cut back to them (atomically).

    Under several processes only the main process rewrites (``rewrite=is_main()``): every process reads
    the same records, and two processes replacing one file would race.
    """
    if not path.is_file():
        return []
    kept = [r for r in map(json.loads, filter(str.strip, path.read_text(encoding="utf-8").splitlines()))
            if r.get("step", 0) <= step]
    if rewrite:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
    return kept
