"""Waits that used to last for ever end with one line (issue #28 item 9), tested without several processes.

A JIT build's lock file left by a killed build (DeepSpeed's CPU shared-memory op): every later DeepSpeed start
waited on it for ever, on every process. ``bound_extension_builds`` makes torch's wait on such a lock end.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
from torch.utils.file_baton import FileBaton

from rl_lora.training import distributed
from rl_lora.utils.errors import DistributedError


@pytest.fixture
def bounded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))  # set: left as the user set it
    monkeypatch.setattr(FileBaton, "wait", FileBaton.wait)  # restored after the test
    distributed.bound_extension_builds(timeout=3)
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "ext")


def test_a_stale_build_lock_fails_at_once_with_one_line(bounded: None, tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - distributed.STALE_BUILD_LOCK_S - 60
    os.utime(lock, (old, old))  # left by a build killed ten minutes ago
    started = time.time()
    with pytest.raises(DistributedError, match=r"build lock '.*lock' \(\d+ s old\): a process killed while compiling"):
        FileBaton(str(lock)).wait()
    assert time.time() - started < 2


def test_a_held_build_lock_is_waited_for_then_given_up_after_the_timeout(bounded: None, tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    threading.Timer(0.5, lock.unlink).start()  # a build that ends: the wait ends with it
    FileBaton(str(lock), wait_seconds=0.05).wait()
    lock.touch()  # a build that does not end within distributed.timeout (3 s here)
    started = time.time()
    with pytest.raises(DistributedError, match=r"waited \d+ s on the build lock"):
        FileBaton(str(lock), wait_seconds=0.05).wait()
    assert 3 <= time.time() - started < 6


def test_each_environment_builds_into_its_own_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(FileBaton, "wait", FileBaton.wait)
    monkeypatch.setattr(sys, "prefix", "/nowhere/an-environment-never-built-in")  # its folder cannot exist yet
    distributed.bound_extension_builds(timeout=3)
    folder = Path(os.environ.pop("TORCH_EXTENSIONS_DIR"))
    assert folder.name.startswith("rl-lora-") and not folder.exists()  # named, not made
    # Another environment gets another folder (a DeepSpeed test earlier in a run may have built this one's).
    monkeypatch.setattr(sys, "prefix", "/nowhere/a-second-environment")
    distributed.bound_extension_builds(timeout=3)
    assert Path(os.environ.pop("TORCH_EXTENSIONS_DIR")) != folder


def test_deepspeed_starts_without_compiling_its_inference_only_op(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """DeepSpeed's communication backend compiled its shared-memory all-reduce op at every environment's first
    start (about 50 CPU-s, a C++ compiler needed) though training never calls it; a run marks it unavailable, so
    the backend starts without it (and its inference all-reduce falls back to the process group's)."""
    import importlib

    import deepspeed.ops

    ds_comm = importlib.import_module("deepspeed.comm.torch")  # the module (its package's `torch` is torch's)

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm",
                        deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm", False))  # restored after
    distributed.skip_inference_comm_build()
    assert ds_comm.build_shm_op() is None
    assert not (tmp_path / "ext").exists()  # nothing was built
