"""Shared set-up: an isolated model cache and offline W&B (the tiny recipe is in tests_support.py)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Tests never use the hub; a hub name fails at once instead of after ~25 s of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (-n 2) every worker and the runs it starts take one torch thread: two processes of two
# spinning OpenMP threads each on 2 cores ran the default recipe 4x slower than one at a time (5+ min instead of
# 79 s). Set before torch is imported; a run's own train.threads still wins.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Nothing in rl-lora compiles, but bitsandbytes (the qlora extra, imported by PEFT) wraps its kernels in
# torch.compile at import, which loads torch's compiler: about 1.4 CPU-s in each of the suite's processes (the
# runs it launches, torchrun's workers, Ray's) for nothing. The tests and every process they start inherit this.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Built-in models go to a per-session folder, never the user's ~/.cache."""
    os.environ["RL_LORA_CACHE"] = str(tmp_path_factory.mktemp("rl-lora-cache"))




def _long(item: pytest.Item) -> bool:
    return item.get_closest_marker("slow") is not None or item.get_closest_marker("multiprocess") is not None


def _group(item: pytest.Item) -> str | None:
    mark = item.get_closest_marker("xdist_group")
    return (mark.args[0] if mark.args else mark.kwargs.get("name")) if mark is not None else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, the long tests first (``slow`` or ``multiprocess``; the order is otherwise kept). A
    worker takes the next group or test whenever it is free (xdist puts groups of several tests first), so a
    long test collected last keeps one worker busy while the other has nothing left: longest first leaves the
    short ones to fill in. The tests of one ``xdist_group`` keep their order (they share a fixture, and some
    must run last), and a single process keeps pytest's order, so that a module's fixtures are built once."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    long_groups = {_group(item) for item in items if _long(item)} - {None}
    items.sort(key=lambda item: not (_long(item) or _group(item) in long_groups))
