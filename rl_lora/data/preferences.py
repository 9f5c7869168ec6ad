"""Preference pairs for DPO and reward-model training, read from a file or a ``datasets`` source.

Sources are read by rl_lora/data/sources.py: JSONL, JSON, parquet or CSV files, ``save_to_disk`` folders,
hub datasets. Rows follow TRL's preference formats: ``{prompt, chosen, rejected}`` (explicit prompt) or
``{chosen, rejected}`` (implicit prompt), each field a string or, for conversational data, a list of
``{"role", "content"}`` messages. Every row is checked before any model loads, and every bad row is
reported at once (up to ten, with the total), by source, row (counted from 1; for JSONL, the line number)
and field. The arithmetic task's own pairs are in rl_lora/tasks/arithmetic/pairs.py.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the rows are checked before any heavy library loads (rl_lora/launch/precheck.py)
    from transformers import PreTrainedTokenizerBase

from rl_lora.config.algorithms import algorithm_info
from rl_lora.data.chat import check_messages
from rl_lora.data.sources import BadRow, read_rows, report_bad_rows
from rl_lora.utils.errors import DataError

FIELDS = ("prompt", "chosen", "rejected")

# A further check of one validated row: (row, "dataset 'x' row N") -> None, or raises DataError.
RowCheck = Callable[[dict[str, Any], str], None]


def read_preference_file(
    path: str | Path, row_check: RowCheck | None = None, split: str = "train", subset: str | None = None
) -> list[dict[str, Any]]:
    """The validated rows of a preference source (only its prompt/chosen/rejected fields), or DataError.

    ``row_check`` runs on every row after the format checks (e.g. ``prompt_length_check``).
    """
    return validate_rows(read_rows(path, split, subset), str(path), row_check)


def validate_rows(
    numbered: list[tuple[int, Any]], name: str, row_check: RowCheck | None = None
) -> list[dict[str, Any]]:
    """Check every row; all rows must share one format (the first good row's fields and kind).

    Every bad row is collected and reported in one DataError (the first ``MAX_REPORTED``), in row order.
    """
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    layout: tuple[tuple[str, ...], bool] | None = None
    for row_no, row in numbered:
        where = f"dataset '{name}' row {row_no}"
        try:
            clean = _check_layout(row, where, layout)
            if row_check is not None:
                row_check(clean, where)
        except DataError as exc:
            problems.append(str(exc))
            continue
        layout = layout or (tuple(clean), isinstance(clean["chosen"], list))
        rows.append(clean)
    report_bad_rows(problems)
    return rows


def _check_layout(row: Any, where: str, layout: tuple[tuple[str, ...], bool] | None) -> dict[str, Any]:
    if isinstance(row, BadRow):
        raise DataError(f"{where}: {row.problem}")
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with 'chosen' and 'rejected', got {type(row).__name__}")
    clean = _check_row(row, where)
    kind = (tuple(clean), isinstance(clean["chosen"], list))
    if layout is None:
        return clean
    if kind[0] != layout[0]:
        missing = sorted(set(layout[0]) - set(kind[0]))
        detail = f"field '{missing[0]}' is missing" if missing else "field 'prompt' is not in the earlier rows"
        raise DataError(f"{where}: {detail} (every row must have the fields {list(layout[0])})")
    if kind[1] != layout[1]:
        formats = ("plain text", "conversational")
        raise DataError(f"{where}: is {formats[kind[1]]} but earlier rows are {formats[layout[1]]}")
    return clean


def prompt_limit_check(config: Any, found: tuple[Any, int | None] | None) -> RowCheck | None:
    """The prompt-length row check for a recipe, given its policy's (tokenizer, context length) or None.

    The limit is the trainer's max_length, or the model's context where that is smaller; None when no
    tokenizer could be had without loading weights.
    """
    if found is None:
        return None
    tokenizer, context = found
    limits = [(f"the context of model '{config.model.policy}'", context)] if context is not None else []
    key = algorithm_info(config.algorithm).length_key  # e.g. dpo.max_length
    if key is not None:
        section, field = key.split(".")
        limits.insert(0, (key, getattr(getattr(config, section), field)))
    if not limits:
        return None
    setting, limit = min(limits, key=lambda pair: pair[1])  # the trainer's limit unless the context is smaller
    return prompt_length_check(tokenizer, limit, setting)


def prompt_length_check(tokenizer: PreTrainedTokenizerBase, limit: int, setting: str) -> RowCheck:
    """A row check refusing a prompt of ``limit`` tokens or more (``setting`` names where the limit comes from).

    TRL keeps the start of a pair longer than its max_length, so such a row would train DPO on no completion
    token at all, and the reward trainer would drop it silently; past the model's context the positions
    are ones the model never saw. A conversational prompt is counted through the chat template (when the
    tokenizer has none, the run is refused anyway, naming the template).
    """

    def check(row: dict[str, Any], where: str) -> None:
        prompt = row.get("prompt")
        if prompt is None:
            return
        if isinstance(prompt, list):
            if not getattr(tokenizer, "chat_template", None):
                return
            ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
            ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
        else:
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if len(ids) >= limit:
            raise DataError(f"{where}: field 'prompt' is {len(ids)} tokens, not under {setting} ({limit}): "
                            "no completion token would fit")

    return check


def _check_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise DataError(f"{where}: field '{key}' is missing")
    clean = {key: row[key] for key in FIELDS if key in row and not (key == "prompt" and row[key] is None)}
    for key, value in clean.items():
        _check_field(value, f"{where}: field '{key}'")
    chat = [isinstance(v, list) for v in clean.values()]
    if any(chat) and not all(chat):
        raise DataError(f"{where}: mixes plain-text and conversational fields (all must be strings, or all lists)")
    if clean["chosen"] == clean["rejected"]:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical")
    return clean


def _check_field(value: Any, what: str) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{what} is empty")
        return
    check_messages(value, what)


def is_conversational(rows: list[dict[str, Any]]) -> bool:
    return bool(rows) and isinstance(rows[0]["chosen"], list)


def split_rows(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): a seeded ``fraction`` of the rows held out (at least one, and one left to train)."""
    if len(rows) < 2:
        raise DataError(f"a preference file needs at least 2 rows to hold some out, got {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_held = min(max(1, round(fraction * len(rows))), len(rows) - 1)
    held = set(order[:n_held])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]
