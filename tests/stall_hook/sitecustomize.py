"""Test hook: one process of a run under several processes stops answering the others, as a hung one would.

For tests/test_distributed.py's watchdog test: in the worker whose ``RANK`` is ``RL_LORA_TEST_STALL_RANK``, the
tracker sleeps for good at the end of step ``RL_LORA_TEST_STALL_STEP``, so the other processes wait for it at
their next collective. Without the variables it does nothing.
"""

import os

_STEP = os.environ.get("RL_LORA_TEST_STALL_STEP")

if _STEP and os.environ.get("RANK") == os.environ.get("RL_LORA_TEST_STALL_RANK", "1"):
    import time
    from typing import Any

    from rl_lora.training.tracking import RunTracker

    _on_step_end = RunTracker.on_step_end

    def _stall(self: Any, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _on_step_end(self, args, state, control, **kwargs)
        if state.global_step == int(_STEP):
            time.sleep(3600)  # the run's other processes must give up on this one; torchrun then ends it

    RunTracker.on_step_end = _stall  # type: ignore[method-assign]
