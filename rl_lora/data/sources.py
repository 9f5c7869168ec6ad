"""Reading a dataset's rows from wherever a recipe points: a file, a ``save_to_disk`` folder, or the hub.

Files: ``.jsonl`` (one row per line, numbered by line), ``.json`` (a list of rows), ``.parquet`` and
``.csv`` (every value a string). Folders written by ``datasets``' ``save_to_disk`` (a Dataset, or a
DatasetDict and a split). Any other name is tried as a hub dataset through ``datasets.load_dataset``,
which needs the hub. Rows come back numbered from 1, so every later check can name the row.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl_lora.utils.errors import DataError, first_line
from rl_lora.utils.text import lone_surrogate

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
MAX_REPORTED = 10  # bad rows listed in one error


@dataclass(frozen=True)
class BadRow:
    """A row that could not be parsed (a JSONL line that is not JSON): reported with the other bad rows."""

    problem: str


def report_bad_rows(problems: list[str]) -> None:
    """Raise one DataError listing ``problems`` (one per bad row, in file order, up to MAX_REPORTED)."""
    if not problems:
        return
    more = f" (and {len(problems) - MAX_REPORTED} more)" if len(problems) > MAX_REPORTED else ""
    head = f"{len(problems)} bad rows: " if len(problems) > 1 else ""
    raise DataError(head + "; ".join(problems[:MAX_REPORTED]) + more)

NumberedRows = list[tuple[int, Any]]


def read_rows(source: str | Path, split: str = "train", subset: str | None = None) -> NumberedRows:
    """``(row number, row)`` pairs of ``source``, or DataError naming the source and what is wrong."""
    name = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        rows = _disk_rows(path, name, split)
    elif path.is_file():
        rows = _file_rows(path, name)
    elif path.suffix in SUFFIXES or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise DataError(f"dataset '{name}' does not exist")  # a path, not a hub name ("owner/name")
    else:
        rows = _hub_rows(name, split, subset)
    if not rows:
        raise DataError(f"dataset '{name}' has no rows")
    return rows


def _file_rows(path: Path, name: str) -> NumberedRows:
    if path.suffix not in SUFFIXES:
        raise DataError(f"dataset '{name}': unsupported file type '{path.suffix}' (use {', '.join(SUFFIXES)}, or a "
                        "folder written by save_to_disk)")
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows, ".csv": _csv_rows}
    try:
        return readers[path.suffix](path, name)
    except UnicodeDecodeError as exc:
        raise DataError(f"dataset '{name}' cannot be read: not UTF-8 text (byte {exc.object[exc.start]:#04x} "
                        f"at offset {exc.start})") from None
    except OSError as exc:
        raise DataError(f"dataset '{name}' cannot be read ({exc.strerror or exc})") from None


def _jsonl_rows(path: Path, name: str) -> NumberedRows:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((line_no, _text_checked(json.loads(line))))
            except json.JSONDecodeError as exc:  # one bad row among others, not the end of the check
                rows.append((line_no, BadRow(f"not valid JSON ({exc.msg} at column {exc.colno})")))
    return rows


def _json_rows(path: Path, name: str) -> NumberedRows:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        problem = f"{exc.msg} at line {exc.lineno}, column {exc.colno}"
        raise DataError(f"dataset '{name}': not valid JSON ({problem})") from None
    if not isinstance(data, list):
        raise DataError(f"dataset '{name}': expected a JSON list of rows, got {type(data).__name__}")
    return [(i, _text_checked(row)) for i, row in enumerate(data, start=1)]


def _text_checked(row: Any) -> Any:
    """``row``, or a BadRow when one of its strings is not Unicode text: JSON's ``\\ud800`` escape parses to a lone
    surrogate, which no tokenizer takes (tokenizers raised a TypeError mid-run)."""
    bad = lone_surrogate(row)
    if bad is None:
        return row
    return BadRow(f"holds {ascii(bad)[:40]}, a lone surrogate escape: not valid Unicode text")


def _parquet_rows(path: Path, name: str) -> NumberedRows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"dataset '{name}' cannot be read as parquet ({exc})") from None
    return list(enumerate(table.to_pylist(), start=1))


def _csv_rows(path: Path, name: str) -> NumberedRows:
    """Rows numbered from 1 after the header line; a row with more cells than the header is refused."""
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        rows = []
        for row_no, row in enumerate(reader, start=1):
            if None in row:
                raise DataError(f"dataset '{name}' row {row_no}: more cells than the header's "
                                f"{len(reader.fieldnames or [])} columns")
            rows.append((row_no, dict(row)))
    return rows


def _disk_rows(path: Path, name: str, split: str) -> NumberedRows:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except (FileNotFoundError, ValueError):
        raise DataError(f"dataset '{name}' is a folder, not a file, and not a folder written by datasets' "
                        "save_to_disk") from None
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise DataError(f"dataset '{name}' has no split '{split}' (splits: {', '.join(loaded)}; set data.split)")
        loaded = loaded[split]
    return list(enumerate(loaded.to_list(), start=1))


def _hub_rows(name: str, split: str, subset: str | None) -> NumberedRows:
    """A hub dataset through ``datasets.load_dataset``; refused in one line when the hub cannot be reached."""
    from datasets import load_dataset

    try:
        loaded = load_dataset(name, subset, split=split)
    except Exception as exc:  # offline, unknown name, missing config or split: one line, naming the dataset
        first = first_line(exc)
        raise DataError(
            f"dataset '{name}' is not a local file or folder, and loading it from the hub failed (a hub dataset "
            f"needs the hub; download it and save_to_disk, or point data.source at a file): {first[:300]}"
        ) from None
    return list(enumerate(loaded.to_list(), start=1))
