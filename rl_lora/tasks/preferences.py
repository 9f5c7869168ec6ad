"""Preference pairs for DPO and reward-model training: built from the policy's own samples, or read from a file.

The built-in pairs pair a prompt's correct answer (chosen) with one of the policy's OWN wrong samples
(rejected), not a random string: the mistakes a preference method must learn to tell apart are the
ones the policy actually makes. They are sampled once per policy and data section, deterministically
from ``data.split_seed``, and cached beside the built-in model.

A file may be JSONL (one row per line), JSON (a list of rows) or parquet, in TRL's standard
preference formats: ``{prompt, chosen, rejected}`` or ``{chosen, rejected}`` (implicit prompt), each
field a string or, for conversational data, a list of ``{"role", "content"}`` messages. Every row is
checked before any model loads; the first bad one is reported by file, row (counted from 1; for
JSONL, the line number) and field.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rl_lora.config import DataSpec
from rl_lora.errors import DataError
from rl_lora.tasks import arithmetic
from rl_lora.tasks.arithmetic import Problem, extract_answer

FIELDS = ("prompt", "chosen", "rejected")
SUFFIXES = (".jsonl", ".json", ".parquet")
PAIRS_VERSION = 1  # bump when the way built-in pairs are sampled changes
SAMPLE_BATCH = 512  # prompts per generate call while sampling built-in pairs

# A further check of one validated row: (row, "dataset 'x' row N") -> None, or raises DataError.
RowCheck = Callable[[dict[str, Any], str], None]


# -- files ---------------------------------------------------------------------------------------
def read_preference_file(path: str | Path, row_check: RowCheck | None = None) -> list[dict[str, Any]]:
    """The validated rows of a preference file (only its prompt/chosen/rejected fields), or DataError.

    ``row_check`` runs on every row after the format checks (e.g. ``prompt_length_check``).
    """
    name = str(path)
    path = Path(path)
    if path.is_dir():
        raise DataError(f"dataset '{name}' is a folder, not a file")
    if not path.is_file():
        raise DataError(f"dataset '{name}' does not exist")
    if path.suffix not in SUFFIXES:
        raise DataError(f"dataset '{name}': unsupported file type '{path.suffix}' (use {', '.join(SUFFIXES)})")
    try:
        numbered = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows}[path.suffix](path, name)
    except UnicodeDecodeError as exc:
        raise DataError(f"dataset '{name}' cannot be read: not UTF-8 text (byte {exc.object[exc.start]:#04x} "
                        f"at offset {exc.start})") from None
    except OSError as exc:
        raise DataError(f"dataset '{name}' cannot be read ({exc.strerror or exc})") from None
    if not numbered:
        raise DataError(f"dataset '{name}' has no rows")
    return validate_rows(numbered, name, row_check)


def _jsonl_rows(path: Path, name: str) -> list[tuple[int, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((line_no, json.loads(line)))
            except json.JSONDecodeError as exc:
                problem = f"{exc.msg} at column {exc.colno}"
                raise DataError(f"dataset '{name}' row {line_no}: not valid JSON ({problem})") from None
    return rows


def _json_rows(path: Path, name: str) -> list[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        problem = f"{exc.msg} at line {exc.lineno}, column {exc.colno}"
        raise DataError(f"dataset '{name}': not valid JSON ({problem})") from None
    if not isinstance(data, list):
        raise DataError(f"dataset '{name}': expected a JSON list of rows, got {type(data).__name__}")
    return list(enumerate(data, start=1))


def _parquet_rows(path: Path, name: str) -> list[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"dataset '{name}' cannot be read as parquet ({exc})") from None
    return list(enumerate(table.to_pylist(), start=1))


def validate_rows(
    numbered: list[tuple[int, Any]], name: str, row_check: RowCheck | None = None
) -> list[dict[str, Any]]:
    """Check every row; all rows must share one format (the first row's fields and kind)."""
    rows: list[dict[str, Any]] = []
    layout: tuple[tuple[str, ...], bool] | None = None
    for row_no, row in numbered:
        where = f"dataset '{name}' row {row_no}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with 'chosen' and 'rejected', got {type(row).__name__}")
        clean = _check_row(row, where)
        kind = (tuple(clean), isinstance(clean["chosen"], list))
        if layout is None:
            layout = kind
        elif kind[0] != layout[0]:
            missing = sorted(set(layout[0]) - set(kind[0]))
            detail = f"field '{missing[0]}' is missing" if missing else "field 'prompt' is not in the earlier rows"
            raise DataError(f"{where}: {detail} (every row must have the fields {list(layout[0])})")
        elif kind[1] != layout[1]:
            formats = ("plain text", "conversational")
            raise DataError(f"{where}: is {formats[kind[1]]} but earlier rows are {formats[layout[1]]}")
        if row_check is not None:
            row_check(clean, where)
        rows.append(clean)
    return rows


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
    if not isinstance(value, list):
        raise DataError(f"{what} must be a string or a list of messages, got {type(value).__name__}")
    if not value:
        raise DataError(f"{what} is empty")
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{what}: message {i} must be an object with a 'role' and a 'content'")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{what}: message {i} has an empty or missing 'content'")


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


# -- built-in pairs from the policy's own samples ------------------------------------------------
@torch.no_grad()
def sample_completions(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], n: int, max_new_tokens: int,
    seed: int,
) -> list[list[str]]:
    """``n`` completions per prompt, sampled at temperature 1 (no top-k/top-p): the policy as it is."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the right edge
    out: list[list[str]] = []
    try:
        for start in range(0, len(prompts), SAMPLE_BATCH):
            batch = tokenizer(prompts[start : start + SAMPLE_BATCH], return_tensors="pt", padding=True).to(model.device)
            generated_BN_T = model.generate(
                **batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=n,
                max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(generated_BN_T[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            out.extend(texts[i : i + n] for i in range(0, len(texts), n))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
        torch.random.set_rng_state(generator_state)
    return out


def pairs_from_samples(problems: list[Problem], samples: list[list[str]]) -> list[dict[str, str]]:
    """One pair per problem with a wrong sample: chosen = the answer, rejected = the first wrong answer.

    A sample's answer is its first line (as the exact-answer reward reads it); empty answers are
    skipped, since an empty rejected side is not a usable preference.
    """
    pairs = []
    for problem, texts in zip(problems, samples, strict=True):
        wrong = [a for a in map(extract_answer, texts) if a and a != problem.answer]
        if wrong:
            pairs.append({"prompt": problem.prompt, "chosen": problem.answer, "rejected": wrong[0]})
    return pairs


def builtin_pairs(
    cache_dir: Path | None, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: DataSpec,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(training pairs, held-out pairs) of the built-in task, from the policy's own samples.

    Read from ``cache_dir`` when built before, else built (about 30 s on 2 CPU cores for the 7,800
    training prompts at 2 samples each) and saved there. ``cache_dir`` is the built-in model's own
    folder, whose name already identifies the model and the split; other models pass None and their
    pairs are rebuilt every run.
    """
    fields = {k: v for k, v in data.model_dump().items() if k not in ("preferences", "eval_preferences")}
    key = hashlib.sha256(json.dumps({"version": PAIRS_VERSION, "data": fields}, sort_keys=True).encode())
    path = cache_dir / f"preferences-{key.hexdigest()[:12]}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        return cached["train"], cached["held_out"]
    train, held_out = arithmetic.split(data)
    pairs = {}
    for name, problems in (("train", train), ("held_out", held_out)):
        samples = sample_completions(
            model, tokenizer, [p.prompt for p in problems], data.samples_per_prompt, arithmetic.answer_tokens(data),
            data.split_seed,
        )
        pairs[name] = pairs_from_samples(problems, samples)
    if not pairs["train"]:
        raise DataError("the policy answered every training prompt correctly in every sample: no built-in "
                        "preference pairs (use a less-trained policy or more data.samples_per_prompt)")
    if path is not None:
        _write_atomic(path, pairs)
    return pairs["train"], pairs["held_out"]


def _write_atomic(path: Path, payload: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f)
    os.replace(tmp, path)
