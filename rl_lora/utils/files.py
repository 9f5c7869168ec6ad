"""Durable file helpers shared by the model cache and checkpoints: a file's sha256, and a folder that
appears in one atomic rename or not at all."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """Where rl-lora caches built and dequantised models: $RL_LORA_CACHE, else ~/.cache/rl-lora."""
    return Path(os.environ.get("RL_LORA_CACHE", Path.home() / ".cache" / "rl-lora"))


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (0.3 s for a 98 MB file)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_folder_atomically(target: Path, build: Callable[[Path], object],
                            done: Callable[[Path], bool] | None = None) -> Path:
    """Run ``build(staging)`` in a hidden folder beside ``target``, then rename it to ``target``.

    A reader sees either no ``target`` or a complete one; an interrupted build leaves only a
    ``.<name>.tmp-*`` folder, removed when the build raises. Processes building the same ``target``
    at once (the ranks of a multi-process run, a sweep's jobs on a cold cache) take turns on a lock
    file beside it: the first builds, the others wait and, once ``done(target)`` says the folder is
    complete (default: it exists), use it without building again.
    """
    from filelock import FileLock

    is_done = done or Path.exists
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if is_done(target):
            return target
        shutil.rmtree(target, ignore_errors=True)  # an incomplete folder (not ours: we hold the lock) is replaced
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(staging)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target
