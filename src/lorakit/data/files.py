"""Read training rows from local files (through ``datasets``) or a built-in task, and check them.

Row formats (picked from the columns unless ``data_format`` says otherwise)::

    text            {"text": "..."}
    instruction     {"instruction": "...", "input": "..." (optional), "output": "..."}
    chat            {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}
    completion      {"prompt": "...", "completion": "..."}
    classification  {"text": "...", "text_pair": "..." (optional), "label": 3 | "positive"}

GLUE files (``.tsv``, or ``.csv`` with GLUE's column names) become classification rows (``glue.py``).

Every row is checked before anything trains: a missing or mistyped field is a ``DataError`` naming
the file, the row (1-based, in file order; for CSV the header is not counted) and the field. Nothing
is dropped here; what tokenization truncates or drops is counted in ``encode.py``. Other tools'
layouts (ShareGPT, conversational prompt/completion) and a column mapping are turned into these by
``formats.normalize`` first.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import tasks
from ..errors import ConfigError, DataError
from . import glue
from .formats import normalize
from .guard import scan_file

BUILTIN_PREFIX = "builtin:"  # `--data builtin:TASK`: one of lorakit's embedded task files

FORMATS = ("text", "instruction", "chat", "completion", "classification")
INPUT_FORMATS = (*FORMATS, "sharegpt")  # sharegpt rows become chat rows (formats.py)
ROLES = ("system", "user", "assistant", "tool")
_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}
_NEEDS = {
    "text": "text",
    "instruction": "instruction, output (and optionally input)",
    "chat": "messages (a list of {role, content})",
    "completion": "prompt, completion",
    "classification": "text, label (and optionally text_pair)",
}


@dataclass
class RawData:
    rows: list[dict[str, Any]]
    format: str
    source: str  # a file path or builtin:TASK


def read_data(spec: str, data_format: str = "auto", split: str = "train", builtin_rows: int = 2000,
              seed: int = 0, columns: dict[str, str] | None = None) -> RawData:
    """Rows of ``spec`` (a file, or ``builtin:TASK``), checked against their format. ``columns`` maps
    lorakit's field names to the file's columns (``{"instruction": "question"}``)."""
    if isinstance(spec, os.PathLike):  # TrainArgs(data=Path(...)) is a natural thing to write
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"data={spec!r}: give the path of a .jsonl, .json, .csv, .tsv or .parquet file (a str or "
                          "Path), or builtin:TASK for a built-in task.")
    if columns is not None and not isinstance(columns, dict):
        raise ConfigError(f"columns={columns!r}: must be a mapping of lorakit field → column name, e.g. "
                          "{'instruction': 'question', 'output': 'answer'}.")
    if spec.startswith(BUILTIN_PREFIX):
        return _read_builtin(spec[len(BUILTIN_PREFIX):], data_format, split, builtin_rows, seed)
    path = Path(spec)
    if path.is_dir():
        raise DataError(f"data {spec} is a directory; pass one .jsonl, .json, .csv, .tsv or .parquet file inside it, "
                        "or builtin:TASK for a built-in task.")
    if not path.is_file():
        raise DataError(f"data file {spec} does not exist; pass a .jsonl, .json, .csv, .tsv or .parquet file, "
                        "or builtin:TASK for a built-in task.")
    loader = _LOADERS.get(path.suffix.lower())
    if loader is None:
        raise DataError(f"{spec}: unknown extension {path.suffix!r}; use .jsonl, .json, .csv, .tsv or .parquet.")
    rows, names = glue.read_tsv(path) if loader == "tsv" else _load(path, loader)
    if loader in ("tsv", "csv") and glue.is_glue(names):
        rows, names = glue.to_classification(rows, names, spec)
    if not rows:
        raise DataError(f"{spec} holds no rows; give it at least one training example.")
    if data_format not in ("auto", *INPUT_FORMATS):
        raise ConfigError(f"data_format={data_format!r}: use auto or one of {', '.join(INPUT_FORMATS)}.")
    rows, names, data_format = normalize(rows, names, columns, data_format, spec)
    fmt = detect_format(names, data_format, spec)
    for i, row in enumerate(rows):
        check_row(row, fmt, spec, i + 1)
    return RawData(rows, fmt, spec)


def _read_builtin(name: str, data_format: str, split: str, n: int, seed: int) -> RawData:

    task = tasks.get(name)  # ConfigError naming the known tasks on a typo
    if data_format not in ("auto", "instruction"):
        raise ConfigError(f"builtin:{name} rows are instruction rows; drop data_format={data_format}.")
    return RawData(task.examples(n, seed=seed, split=split), "instruction", f"{BUILTIN_PREFIX}{name}")


def _load(path: Path, loader: str) -> tuple[list[dict], list[str]]:
    import datasets

    scan_file(path)  # UTF-8 or a DataError naming the line, before datasets' own decoding errors
    if _blank(path):  # datasets' own error for it is a bare StopIteration
        raise DataError(f"{path}: the file is empty (no rows); write one row per line (JSONL) or a header and rows "
                        "(CSV).")
    if _no_rows(path, loader):  # datasets' own errors for these say "no data" / "BatchSize must be > 0"
        raise DataError(f"{path} holds no rows (only a header, or an empty table); give it at least one training "
                        "example.")
    datasets.disable_progress_bars()
    try:
        # force_redownload: datasets' cache keys a local file by path, size and mtime, so a rewrite
        # keeping both would serve stale rows; re-reading a local file is cheap.
        ds = datasets.load_dataset(loader, data_files=str(path), split="train", download_mode="force_redownload")
    except Exception as exc:  # datasets wraps parser errors in its own types
        cause = exc.__cause__ or exc
        where = _first_bad_json_line(path) if loader == "json" else None
        detail = where or f"{type(cause).__name__}: {cause}"
        raise DataError(f"{path}: cannot be read as {loader} ({detail}). Fix the file; every row must "
                        "have the same fields with the same types.") from None
    return ds.to_list(), list(ds.column_names)


def _no_rows(path: Path, loader: str) -> bool:
    """A CSV of one non-blank line (its header) or a parquet table of zero rows."""
    if loader == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows == 0
        except (OSError, ValueError):  # not readable as parquet (ArrowInvalid): datasets' error below names it
            return False
    if loader == "csv":  # stops at the second non-blank line: a large file is not read again
        with open(path, "rb") as fh:
            return sum(1 for _ in itertools.islice((ln for ln in fh if ln.strip()), 2)) <= 1
    return False


def _blank(path: Path) -> bool:
    """Only whitespace (read in 1 MiB blocks: stops at the first non-blank one)."""
    if path.suffix.lower() == ".parquet":
        return path.stat().st_size == 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            if block.strip():
                return False
    return True


def _first_bad_json_line(path: Path) -> str | None:
    if path.suffix.lower() != ".jsonl":
        return None
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"line {n} is not valid JSON: {exc.msg}"
            if not isinstance(obj, dict):
                return f"line {n} is a {type(obj).__name__}, not a JSON object"
    return None


def detect_format(columns: list[str], requested: str, source: str) -> str:
    if requested != "auto":
        if requested not in FORMATS:
            raise ConfigError(f"data_format={requested!r}: use auto or one of {', '.join(FORMATS)}.")
        return requested
    cols = set(columns)
    if "messages" in cols:
        return "chat"
    if {"prompt", "completion"} <= cols:
        return "completion"
    if cols & {"instruction", "output"}:
        return "instruction"
    if {"text", "label"} <= cols:
        return "classification"
    if "text" in cols:
        return "text"
    raise DataError(
        f"{source}: cannot tell the row format from the columns {sorted(cols)}. Rows need one of: "
        + "; ".join(f"{k}: {v}" for k, v in _NEEDS.items())
        + ". Map your columns onto these fields with columns.FIELD=COLUMN (e.g. columns.instruction=question "
        "columns.output=answer), or use ShareGPT 'conversations' rows."
    )


def check_row(row: dict[str, Any], fmt: str, source: str, n: int) -> None:
    """Raise ``DataError`` naming ``source``, row ``n`` and the field when ``row`` does not fit ``fmt``."""
    def fail(field: str, problem: str) -> DataError:
        return DataError(f"{source} row {n}: {problem} (field {field!r}); {fmt} rows need {_NEEDS[fmt]}. "
                         "Fix or remove the row.")

    def need_str(field: str, optional: bool = False) -> None:
        value = row.get(field)
        if value is None:
            if optional:
                return
            raise fail(field, "missing field")
        if not isinstance(value, str):
            raise fail(field, f"expected a string, got {type(value).__name__}")

    if fmt == "text":
        need_str("text")
    elif fmt == "instruction":
        need_str("instruction")
        need_str("input", optional=True)
        need_str("output")
    elif fmt == "completion":
        need_str("prompt")
        need_str("completion")
    elif fmt == "classification":
        need_str("text")
        need_str("text_pair", optional=True)
        label = row.get("label")
        if label is None:
            raise fail("label", "missing field")
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise fail("label", f"expected an integer or a string, got {type(label).__name__}")
    elif fmt == "chat":
        messages = row.get("messages")
        if messages is None:
            raise fail("messages", "missing field")
        if not isinstance(messages, list) or not messages:
            raise fail("messages", "expected a non-empty list of {role, content}")
        for j, m in enumerate(messages):
            if not isinstance(m, dict):
                raise fail(f"messages[{j}]", f"expected an object, got {type(m).__name__}")
            if m.get("role") not in ROLES:
                raise fail(f"messages[{j}].role", f"role {m.get('role')!r} is not one of {', '.join(ROLES)}")
            # An assistant turn that only calls tools may have no content (OpenAI's format).
            if not isinstance(m.get("content"), str) and not (m.get("content") is None and m.get("tool_calls")):
                raise fail(f"messages[{j}].content", "missing or not a string")
            if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
                raise fail(f"messages[{j}].tool_calls", "expected a list of tool calls")
        if not any(m["role"] == "assistant" for m in messages):
            raise fail("messages", "no assistant turn, so there is nothing to learn")
