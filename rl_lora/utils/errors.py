"""The project's exception hierarchy.

Every error a user can cause by what they wrote (a recipe, a data file, a reward plug-in) is one of
these (``USER_ERRORS``), so the command line can print it as one clear line and exit non-zero.
"""

# A reward's error is defined beside the reward protocol, so that rewards need not import the library.
from reward_models.protocol import RewardError


class RlLoraError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""


class ConfigError(RlLoraError):
    """A recipe or command-line override that does not validate."""


class DataError(RlLoraError):
    """A dataset file, row or field that cannot be used."""


class ModelError(RlLoraError):
    """A model or tokenizer that cannot be loaded or does not fit the recipe."""


class CheckpointError(RlLoraError):
    """A run folder or checkpoint that cannot be written or read."""


class DistributedError(RlLoraError):
    """A run under several processes whose processes stopped answering each other: a collective waited past
    ``distributed.timeout`` or lost a process. Raised instead of hanging; the other processes' logs say why."""


class DashboardError(RlLoraError):
    """A W&B dashboard that cannot be published: no login, no such entity or project, the extra missing."""


def first_line(exc: BaseException) -> str:
    """An exception's first line, for a one-line error that wraps it (its type's name where it says nothing)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# The characters str.splitlines breaks a line at: a user's key or value holding one (a column named "\r")
# would split the one-line error; they are written as their escapes instead.
_LINE_BREAKS = str.maketrans({c: c.encode("unicode_escape").decode("ascii")
                              for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


def one_line(text: str) -> str:
    """``text`` as one line: its line-breaking characters written as escapes (``\\n``, ``\\r``, ``\\u2028``)."""
    return text.strip().translate(_LINE_BREAKS)


# What the command line reports in one line, without a traceback.
USER_ERRORS = (RlLoraError, RewardError)
