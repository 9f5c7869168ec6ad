"""Text a user gave that is not Unicode text: JSON's and YAML's ``\\ud800`` escapes parse to lone surrogates, which no
tokenizer takes and no terminal prints (UTF-8 cannot encode them)."""

from __future__ import annotations

from typing import Any


def lone_surrogate(value: Any) -> str | None:
    """The first string in ``value`` (its keys and values, nested) that cannot be encoded as UTF-8, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value
        return None
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else value if isinstance(value, list) else []
    return next((bad for bad in map(lone_surrogate, items) if bad is not None), None)
