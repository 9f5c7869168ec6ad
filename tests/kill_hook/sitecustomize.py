"""Test hook: SIGKILL this process right after checkpoint ``RL_LORA_TEST_KILL_AFTER_STEP`` is sealed.

Python imports ``sitecustomize`` at start-up from any folder on PYTHONPATH; the resume tests put this
folder there for the run they kill, so the kill lands at one exact point (the checkpoint sealed and the
``latest`` pointer moved, nothing after) however busy the machine is. Without the variable it does nothing.
"""

import os

_STEP = os.environ.get("RL_LORA_TEST_KILL_AFTER_STEP")

if _STEP:
    import signal

    from rl_lora.training import checkpoint

    _seal = checkpoint.seal

    def _seal_then_die(staging: object, root: object, step: int, *args: object, **kwargs: object) -> object:
        sealed = _seal(staging, root, step, *args, **kwargs)
        if step == int(_STEP):
            os.kill(os.getpid(), signal.SIGKILL)
        return sealed

    checkpoint.seal = _seal_then_die
