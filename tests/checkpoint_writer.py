"""A process that saves checkpoints forever, for kill -9 tests: python checkpoint_writer.py ROOT."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rl_lora.training.checkpoint import seal

root = Path(sys.argv[1])
step = 0
while True:
    step += 1
    staging = root / f".staging-{step}.tmp-{os.getpid()}"
    staging.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "optimizer.pt", "trainer_state.json"):
        with (staging / name).open("wb") as f:
            for _ in range(8):  # written in pieces, so a kill can land mid-file
                f.write(os.urandom(64 * 1024))
    seal(staging, root / "checkpoints", step, {"config_hash": "x"}, keep_last=2)
