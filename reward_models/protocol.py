"""The contract between a reward and the library: the call signature, and the one error a reward raises.

This module imports nothing of rl_lora, so a reward plug-in (and this package) can be written, imported
and tested without the library: rl_lora imports rewards, never the other way round. The library's side
of the contract (finding a reward by name, checking what it returns) is rl_lora/tasks/rewards.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> Sequence[float | None]:
        """One score per completion; None where the reward does not apply."""
        ...


class RewardError(Exception):
    """A reward that cannot be found, loaded or called, or returned unusable scores.

    Defined here rather than in rl_lora/utils/errors.py so that rewards need not import the library;
    rl_lora.utils.errors
    re-exports it, and the command line reports it in one line like the library's own errors.
    """
