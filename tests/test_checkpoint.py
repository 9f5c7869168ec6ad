"""Atomic checkpoints: sealed or absent, verified on load, pruning never loses the last good one,
a failed save leaves the previous checkpoint intact, and kill -9 at random moments never leaves a
partial checkpoint that resume would load."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl_lora.training import checkpoint
from rl_lora.utils.errors import CheckpointError

REPO = Path(__file__).resolve().parent.parent


def _stage(tmp: Path, step: int, payload: bytes = b"weights") -> Path:
    staging = tmp / f"staging-{step}.tmp-x"
    staging.mkdir(parents=True)
    (staging / "adapter_model.safetensors").write_bytes(payload + bytes([step]))
    (staging / "sub").mkdir()
    (staging / "sub" / "rng.json").write_text('{"seed": 1}')
    return staging


def test_seal_verify_latest(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    first = checkpoint.seal(_stage(tmp_path, 1), root, 1, {"config_hash": "abc"})
    second = checkpoint.seal(_stage(tmp_path, 2), root, 2, {"config_hash": "abc"})
    assert first.name == "step_000001" and second.name == "step_000002"
    assert checkpoint.latest(root) == second
    manifest = checkpoint.verify(second)
    assert manifest["step"] == 2 and manifest["config_hash"] == "abc"
    assert {f["path"] for f in manifest["files"]} == {"adapter_model.safetensors", "sub/rng.json"}
    assert (root / "latest").read_text() == "step_000002"


def test_corrupt_newest_falls_back_and_staging_is_ignored(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    good = checkpoint.seal(_stage(tmp_path, 1), root, 1, {})
    bad = checkpoint.seal(_stage(tmp_path, 2), root, 2, {})
    (bad / "adapter_model.safetensors").write_bytes(b"flipped!")
    (root / "step_000003.tmp-123").mkdir()  # a save that never finished
    assert checkpoint.latest(root) == good
    with pytest.raises(CheckpointError, match="does not match its sha256|missing or truncated"):
        checkpoint.verify(bad)


def test_keep_last_never_deletes_the_last_good_one(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in range(1, 5):
        checkpoint.seal(_stage(tmp_path, step), root, step, {}, keep_last=2)
    assert [p.name for p in checkpoint.sealed(root)] == ["step_000003", "step_000004"]
    (root / "step_000004" / "manifest.json").unlink()  # newest becomes unverifiable
    checkpoint.prune(root, keep_last=1)
    assert checkpoint.latest(root) == root / "step_000003", "the newest verified checkpoint must survive"


def test_failed_save_names_path_and_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "checkpoints"
    good = checkpoint.seal(_stage(tmp_path, 1), root, 1, {})
    staging = _stage(tmp_path, 2)
    real_replace = os.replace

    def disk_full(src, dst):  # the rename of the folder fails as on a full disk
        if str(dst).endswith("step_000002"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", disk_full)
    with pytest.raises(CheckpointError, match=r"step_000002' failed after \d[\d,]* bytes \(No space left on device\)"):
        checkpoint.seal(staging, root, 2, {})
    assert not staging.exists()
    assert checkpoint.latest(root) == good
    checkpoint.verify(good)


def test_empty_staging_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    with pytest.raises(CheckpointError, match="is empty"):
        checkpoint.seal(tmp_path / "s", tmp_path / "checkpoints", 1, {})


def test_kill_9_at_random_moments_never_leaves_a_loadable_partial(tmp_path: Path) -> None:
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    root = tmp_path / "run"
    last_step = 0
    for trial in range(10):
        proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "checkpoint_writer.py"), str(root)], env=env)
        time.sleep(rng.uniform(0.3, 1.2))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        found = checkpoint.latest(root / "checkpoints")
        if found is None:  # killed before its first seal
            assert trial == 0 or last_step == 0
            continue
        manifest = checkpoint.verify(found)
        assert manifest["step"] >= 1
        for folder in checkpoint.sealed(root / "checkpoints"):
            checkpoint.verify(folder)  # every folder named step_* is complete
        last_step = manifest["step"]
        # Each trial's writer counts steps from 1 again, so later trials re-seal (replace) and prune
        # existing step_* folders too: both paths are under the kill.
        for p in root.glob(".staging-*"):
            assert ".tmp-" in p.name  # leftovers are only ever staging folders
    assert last_step > 0, "no trial got as far as one checkpoint; the test proved nothing"


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """ENOSPC injected into the step-4 seal (after a partial manifest write): the run ends in one line naming the
    intact step-2 checkpoint, which verifies and resumes."""
    import errno
    import json

    from rl_lora.cli import main
    from rl_lora.training import checkpoint as ckpt
    from rl_lora.training import sealing as checkpointing
    from tests_support import tiny_raw

    real_seal = checkpointing.seal

    def seal_until_full(staging: Path, root: Path, step: int, *args: object, **kwargs: object) -> Path:
        if step == 4:
            (staging / "manifest.json").write_text('{"partial')
            raise OSError(errno.ENOSPC, "No space left on device", str(staging / "manifest.json"))
        return real_seal(staging, root, step, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "seal", seal_until_full)
    raw = tiny_raw(tmp_path / "runs", train={"steps": 6, "save_every": 2, "threads": 1},
                   logging={"run_name": "full"})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(raw))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    run = tmp_path / "runs" / "full"
    assert f"rl-lora: error: no space left on the device while writing '{run}/trainer/checkpoint-4/manifest.json'" \
        in err
    assert f"the newest sealed checkpoint '{run}/checkpoints/step_000002' is intact" in err and "--resume" in err
    assert ckpt.latest(run / "checkpoints") == run / "checkpoints" / "step_000002"
    assert ckpt.verify(run / "checkpoints" / "step_000002")["step"] == 2
    monkeypatch.setattr(checkpointing, "seal", real_seal)
    assert main(["run", str(recipe), "--resume", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 2
