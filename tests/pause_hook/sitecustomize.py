"""Test hook: hold this run still right after checkpoint ``RL_LORA_TEST_PAUSE_AFTER_STEP`` is sealed.

For the Ray sweep's node-loss test (tests/test_sweep_ray.py): the run's first attempt writes its pid to
``RL_LORA_TEST_PAUSE_MARKER`` and sleeps, so the test removes its node at one exact point (the checkpoint
sealed, nothing after) however busy the machine is. A resumed attempt (``--resume`` on its command line)
is not held. Without the variables it does nothing.
"""

import os
import sys

_STEP = os.environ.get("RL_LORA_TEST_PAUSE_AFTER_STEP")

if _STEP and "--resume" not in sys.argv:
    import time

    from rl_lora.training import checkpoint

    _seal = checkpoint.seal

    def _seal_then_wait(staging: object, root: object, step: int, *args: object, **kwargs: object) -> object:
        sealed = _seal(staging, root, step, *args, **kwargs)
        if step == int(_STEP):
            with open(os.environ["RL_LORA_TEST_PAUSE_MARKER"], "w", encoding="utf-8") as f:
                f.write(str(os.getpid()))
            time.sleep(600)  # the test removes this node; the process dies with its Ray worker
        return sealed

    checkpoint.seal = _seal_then_wait
