"""Row layouts other tools use, turned into lorakit's own before anything is checked.

``data_files.read_data`` calls :func:`normalize` right after a file is read; what comes out is one of
lorakit's formats (text, instruction, chat, completion, classification), so the checks and the
encoding downstream know nothing about where a layout came from.

* **column mapping** (``columns`` in ``TrainArgs``: ``columns.instruction=question``): lorakit field →
  the file's column. Applied first, so the mapped rows can be any format below.
* **ShareGPT** (LLaMA-Factory, axolotl): ``{"conversations": [{"from": "human", "value": "..."}, ...]}``
  → chat ``messages``. ``from`` is mapped by :data:`SHAREGPT_ROLES`.
* **prompt / completion** (TRL's SFT layout): strings → the ``completion`` format (the prompt is context,
  the loss is on the completion; rendered as plain text ``prompt + completion + </s>``, as TRL does);
  lists of messages (TRL's conversational form) → chat ``messages = prompt + completion``.
* **OpenAI messages with tools** need no conversion: ``tool_calls``, ``tool_call_id``, ``name`` and a
  row-level ``tools`` list pass through to the chat template (see ``encode._render_chat``).

:func:`split_eval` takes a seeded validation split from the training rows (``eval_split``).
"""

from __future__ import annotations

import random
from typing import Any

from ..errors import ConfigError, DataError

# ShareGPT "from" → chat role. LLaMA-Factory's names (observation, function_call) included.
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "function_call": "assistant",
    "system": "system",
    "tool": "tool", "observation": "tool", "function": "tool", "ipython": "tool",
}


def normalize(rows: list[dict[str, Any]], columns: list[str], mapping: dict[str, str] | None,
              requested: str, source: str) -> tuple[list[dict[str, Any]], list[str], str]:
    """``(rows, columns, requested format)`` with the mapping applied and foreign layouts converted."""
    if mapping:
        rows, columns = apply_columns(rows, columns, mapping, source)
    cols = set(columns)
    if requested == "sharegpt" or (requested in ("auto", "chat") and "conversations" in cols and "messages" not in cols):
        rows = [_sharegpt_row(r, source, i + 1) for i, r in enumerate(rows)]
        return rows, _replace(columns, "conversations", "messages"), "chat"
    if requested in ("auto", "completion", "chat") and {"prompt", "completion"} <= cols:
        if rows and isinstance(rows[0].get("prompt"), list):  # TRL's conversational prompt/completion
            rows = [_conversational_row(r, source, i + 1) for i, r in enumerate(rows)]
            return rows, _replace(_replace(columns, "prompt", "messages"), "completion", None), "chat"
        return rows, columns, "completion" if requested == "auto" else requested
    return rows, columns, requested


def apply_columns(rows: list[dict[str, Any]], columns: list[str], mapping: dict[str, str],
                  source: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rename the file's columns to lorakit's fields: ``mapping`` is field → column."""
    for field, column in mapping.items():
        if not isinstance(column, str) or not column:
            raise ConfigError(f"columns.{field}={column!r}: give the name of a column of {source}.")
        if column not in columns:
            raise DataError(f"{source}: columns.{field}={column!r} names no column of the file; its columns "
                            f"are {sorted(columns)}. Fix the mapping (columns.{field}=COLUMN).")
    renamed = {column: field for field, column in mapping.items()}
    # A mapped-over field of the same name is dropped, so {"output": "answer"} wins over a stray 'output'.
    shadowed = set(mapping) - set(mapping.values())
    rows = [{renamed.get(k, k): v for k, v in r.items() if k in renamed or k not in shadowed} for r in rows]
    columns = [renamed.get(c, c) for c in columns if c in renamed or c not in shadowed]
    return rows, columns


def split_eval(rows: list[Any], fraction: float, seed: int, source: str) -> tuple[list[Any], list[Any]]:
    """``(train, eval)``: ``round(fraction × n)`` rows (at least 1) drawn with ``seed`` for eval."""
    n = len(rows)
    k = max(1, round(n * fraction))
    if k >= n:
        raise DataError(f"{source}: eval_split={fraction} leaves no training row out of {n}; lower eval_split "
                        "or pass eval_data.")
    held = set(random.Random(seed).sample(range(n), k))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# -- conversions ------------------------------------------------------------------------------------
def _sharegpt_row(row: dict[str, Any], source: str, n: int) -> dict[str, Any]:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{source} row {n}: expected a non-empty list of {{from, value}} (field 'conversations'); "
                        "fix or remove the row.")
    messages = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict):
            raise DataError(f"{source} row {n}: expected an object (field 'conversations[{j}]').")
        role = SHAREGPT_ROLES.get(str(t.get("from", "")).lower())
        if role is None:
            raise DataError(f"{source} row {n}: 'from' {t.get('from')!r} is not a ShareGPT role (field "
                            f"'conversations[{j}].from'); use one of {', '.join(SHAREGPT_ROLES)}.")
        if not isinstance(t.get("value"), str):
            raise DataError(f"{source} row {n}: missing or not a string (field 'conversations[{j}].value').")
        messages.append({"role": role, "content": t["value"]})
    if isinstance(row.get("system"), str) and row["system"] and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": row["system"]})  # LLaMA-Factory's 'system' column
    out = {k: v for k, v in row.items() if k not in ("conversations", "system")}
    out["messages"] = messages
    return out


def _conversational_row(row: dict[str, Any], source: str, n: int) -> dict[str, Any]:
    prompt, completion = row.get("prompt"), row.get("completion")
    if not isinstance(prompt, list) or not isinstance(completion, list):
        raise DataError(f"{source} row {n}: conversational prompt/completion rows need lists of messages in "
                        "both 'prompt' and 'completion' (field 'completion').")
    out = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
    out["messages"] = list(prompt) + list(completion)
    return out


def _replace(columns: list[str], old: str, new: str | None) -> list[str]:
    return [new if c == old else c for c in columns if not (c == old and new is None)]
