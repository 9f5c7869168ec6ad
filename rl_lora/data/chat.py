"""Conversational data: checking message lists, and rendering them through a tokenizer's chat template."""

from __future__ import annotations

from typing import Any

from rl_lora.utils.errors import DataError, ModelError

ROLES = ("system", "user", "assistant", "tool", "developer")


def check_messages(value: Any, what: str) -> None:
    """Refuse anything but a non-empty list of ``{"role", "content"}`` messages with known roles;
    ``what`` names the place (e.g. "dataset 'x.jsonl' row 3: field 'prompt'")."""
    if not isinstance(value, list):
        raise DataError(f"{what} must be a string or a list of messages, got {type(value).__name__}")
    if not value:
        raise DataError(f"{what} is empty")
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{what}: message {i} must be an object with a 'role' and a 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{what}: message {i} has role '{message['role']}' (known roles: {', '.join(ROLES)})")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{what}: message {i} has an empty or missing 'content'")


def require_chat_template(tokenizer: Any, source: str, dataset: str) -> None:
    """Refuse conversational data for a tokenizer without a chat template, saying what to do."""
    if getattr(tokenizer, "chat_template", None):
        return
    raise DataError(
        f"dataset '{dataset}' is conversational (lists of messages) but the tokenizer of '{source}' has no chat "
        "template: use a chat/instruct model, or give the prompts as plain strings"
    )


def refuse_if_files_lack_chat_template(model: Any, dataset: str) -> None:
    """The light half of ``require_policy_chat_template``, for the precheck: refuses where the policy's tokenizer
    files say it has no chat template, importing nothing heavy; where they do not say, the runner checks."""
    from rl_lora.models.tokenizer_files import light_has_chat_template

    if light_has_chat_template(model) is False:
        require_chat_template(None, model.policy, dataset)


def require_policy_chat_template(model: Any, dataset: str) -> None:
    """``require_chat_template`` for a recipe's policy (``model``: its ModelSpec), from the tokenizer files alone,
    before any weights load; skipped where the tokenizer cannot be had without them (GGUF). A policy folder
    whose tokenizer files say is answered from them alone, without transformers."""
    from rl_lora.models.tokenizer_files import light_has_chat_template

    has_template = light_has_chat_template(model)
    if has_template is False:
        require_chat_template(None, model.policy, dataset)
    if has_template is not None:
        return
    from rl_lora.models.loading import policy_tokenizer_and_context

    found = policy_tokenizer_and_context(model)
    if found is not None:
        require_chat_template(found[0], model.policy, dataset)


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """``messages`` through the tokenizer's chat template, ready for the assistant's reply.

    The text is tokenised later like any plain prompt (by TRL, PPO and the evaluation), with the
    tokenizer's special tokens; a BOS the template writes itself is dropped when the tokenizer adds one
    anyway, so the model never sees two.
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ModelError(f"the policy's tokenizer ('{name}') has no chat template to render conversational prompts "
                         "(use a chat/instruct model, or plain-string prompts)")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer.bos_token_id in tokenizer("")["input_ids"]
    if adds_bos and text.startswith(bos):
        text = text[len(bos) :]
    return text
