"""Instruction rows built from real facts that ship with Python (not hand-written): the Unicode
names of characters, from the standard library's ``unicodedata`` tables."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

# Letters the base model has seen but whose official names it does not recite.
CHARS = "ΩßÆøŁđħŋ∑√∞≈"


def unicode_name_rows(chars: str = CHARS) -> list[dict[str, str]]:
    return [{"instruction": f"What is the Unicode name of the character {c}?", "output": unicodedata.name(c).title()}
            for c in chars]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
