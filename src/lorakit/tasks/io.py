"""Dump a task as a JSONL file, so file-based training (``--data file.jsonl``) sees the same rows."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from .._fs import atomic_write_text
from ..errors import ConfigError
from .format import to_messages
from .registry import get
from .task import Split, Task


def write_jsonl(
    task: str | Task,
    path: str | os.PathLike,
    n: int,
    seed: int = 0,
    split: Split = "train",
    schema: Literal["instruction", "messages"] = "instruction",
) -> Path:
    """Write ``task.examples(n, seed, split)`` to ``path``, one JSON object per line; return the path.

    ``schema="instruction"`` writes ``{"instruction", "input", "output"}`` rows; ``"messages"`` writes
    ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`` rows (chat format), which the
    embedded tokenizer's chat template renders to the same text. The write is atomic.
    """
    if schema not in ("instruction", "messages"):
        raise ConfigError(f"schema={schema!r} must be 'instruction' or 'messages'")
    rows = get(task).examples(n, seed=seed, split=split)
    if schema == "messages":
        rows = [{"messages": to_messages(r)} for r in rows]
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path
