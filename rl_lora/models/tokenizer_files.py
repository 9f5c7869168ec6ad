"""A policy's token counter and context length read from its files with the ``tokenizers`` library alone.

The prompt-length check of preference data (rl_lora/data/preferences.py) needs only to count tokens.
``tokenizers`` reads a ``tokenizer.json`` in a fraction of a second, where transformers takes several
seconds to import on 2 cores, so ``rl-lora run`` can refuse a too-long prompt before the heavy libraries
load (rl_lora/launch/precheck.py). The count is the fast tokenizer's own, special tokens included, the same one
transformers' ``PreTrainedTokenizerFast`` returns. Policies without a ``tokenizer.json`` (slow tokenizers,
GGUF files, hub names) get None: the runner checks them once transformers is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rl_lora.config.schema import ModelSpec
from rl_lora.models.policies import classify


class TokenCounter:
    """Just enough of a tokenizer for the prompt-length check: ``counter(text)["input_ids"]``."""

    chat_template = None  # conversational prompts are left to the runner's check (it renders the template)

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}


def _folder(spec: ModelSpec) -> Path | None:
    policy = classify(spec.policy)
    if policy.source is not None:
        return policy.source.tokenizer_folder(policy.name)
    return Path(spec.policy) if policy.form == "folder" else None


def _context(config: dict[str, Any]) -> int | None:
    text = config.get("text_config") or config
    value = text.get("max_position_embeddings")
    return value if isinstance(value, int) else None


def light_tokenizer_and_context(spec: ModelSpec) -> tuple[TokenCounter, int | None] | None:
    """(token counter, context length) from the policy folder's ``tokenizer.json`` and ``config.json``, or None."""
    folder = _folder(spec)
    if folder is None or not (folder / "tokenizer.json").is_file():
        return None
    try:
        counter = TokenCounter(folder / "tokenizer.json")
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except Exception:  # any unreadable file (tokenizers raises plain Exception): the runner's full check names it
        return None
    return counter, _context(config)


def light_has_chat_template(spec: ModelSpec) -> bool | None:
    """Whether the policy folder's tokenizer files carry a chat template (tokenizer_config.json's
    ``chat_template``, or a chat_template.jinja/.json beside it); None where the files do not say."""
    folder = _folder(spec)
    if folder is None or not (folder / "tokenizer_config.json").is_file():
        return None
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return bool(settings.get("chat_template"))
