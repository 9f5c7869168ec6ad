"""Atomic checkpoints: a checkpoint is either complete and verified, or it does not exist.

transformers' Trainer writes the content (weights or adapter as safetensors, optimizer, scheduler,
RNG states, trainer state with the data position) into a staging folder; ``seal`` then makes it a
checkpoint the way crash-safe stacks do (shared/RELIABILITY.md):

1. every file is fsynced, then the staging folder;
2. ``manifest.json`` lists each file with its size and sha256, the step, the recipe hash and the
   library versions; it is fsynced;
3. the folder is renamed (``os.replace``, same filesystem) to ``checkpoints/step_000123`` and the
   parent folder is fsynced;
4. the ``latest`` pointer is rewritten atomically (write ``latest.tmp``, fsync, ``os.replace``);
5. only then are old checkpoints deleted, never the newest verified one.

On load, ``*.tmp*`` folders and unsealed folders are ignored and the manifest is verified, so a kill
at any moment (inside a save included) loses at most the steps since the last sealed checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from rl_lora.utils.errors import CheckpointError
from rl_lora.utils.files import sha256_file

MANIFEST = "manifest.json"
LATEST = "latest"
PREFIX = "step_"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _write_durably(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def step_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def seal(staging: Path, root: Path, step: int, meta: dict[str, Any], keep_last: int | None = None) -> Path:
    """Turn a fully written ``staging`` folder into the verified checkpoint ``root/step_NNNNNN``."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / step_name(step)
    try:
        entries = []
        for path in _files(staging):
            with path.open("rb+") as f:
                os.fsync(f.fileno())
            entries.append({"path": str(path.relative_to(staging)), "bytes": path.stat().st_size,
                            "sha256": sha256_file(path)})
        if not entries:
            raise CheckpointError(f"checkpoint staging folder '{staging}' is empty")
        manifest = {"step": step, "files": entries, **meta}
        _write_durably(staging / MANIFEST, json.dumps(manifest, indent=2))
        _fsync_dir(staging)
        trash = None
        if target.exists():  # this step was sealed before (a resumed run saving again): move it aside
            trash = root / f"{target.name}.tmp-replaced-{os.getpid()}"  # atomically, so no step_* is ever partial
            os.replace(target, trash)
        os.replace(staging, target)
        _fsync_dir(root)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        _write_durably(root / f"{LATEST}.tmp", target.name)
        os.replace(root / f"{LATEST}.tmp", root / LATEST)
        _fsync_dir(root)
    except OSError as exc:
        written = sum(p.stat().st_size for p in _files(staging)) if staging.exists() else 0
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(
            f"saving checkpoint step {step} to '{target}' failed after {written:,} bytes "
            f"({exc.strerror or exc}); the previous checkpoint is intact"
        ) from exc
    if keep_last:
        prune(root, keep_last)
    return target


def verify(folder: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint; raises CheckpointError on anything missing or altered."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint '{folder}' has no {MANIFEST} (unfinished save)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint '{folder}': unreadable {MANIFEST} ({exc})") from None
    for entry in manifest.get("files", []):
        path = folder / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"checkpoint '{folder}': file '{entry['path']}' is missing or truncated")
        if sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint '{folder}': file '{entry['path']}' does not match its sha256")
    return manifest


def sealed(root: Path) -> list[Path]:
    """Sealed checkpoint folders, oldest first (temporary and staging folders are never listed)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and ".tmp" not in p.name]
    return sorted(found, key=lambda p: p.name)


def latest(root: Path) -> Path | None:
    """The newest checkpoint that verifies, trying the ``latest`` pointer first; None if there is none."""
    candidates = list(reversed(sealed(root)))
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8").strip()
        candidates = [named, *[c for c in candidates if c != named]]
    for folder in candidates:
        try:
            verify(folder)
            return folder
        except CheckpointError:
            continue
    return None


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` verified checkpoints; the newest verified one always stays."""
    newest = latest(root)
    folders = sealed(root)
    for folder in folders[: max(len(folders) - keep_last, 0)]:
        if folder != newest:
            _remove(folder)
    for stale in root.glob(f"{PREFIX}*.tmp-*"):  # left by a kill during an earlier replace or prune
        shutil.rmtree(stale, ignore_errors=True)


def _remove(folder: Path) -> None:
    """Delete a checkpoint so that a kill midway never leaves a partial ``step_*`` folder behind."""
    trash = folder.with_name(f"{folder.name}.tmp-deleting-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)
