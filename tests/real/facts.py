"""Instruction rows built from real facts that ship with Python (not hand-written): the Unicode
names of characters, from the standard library's ``unicodedata`` tables."""

from __future__ import annotations

import unicodedata

# Letters the base model has seen but whose official names it does not recite.
CHARS = "ΩßÆøŁđħŋ∑√∞≈"


def unicode_name_rows(chars: str = CHARS) -> list[dict[str, str]]:
    return [{"instruction": f"What is the Unicode name of the character {c}?", "output": unicodedata.name(c).title()}
            for c in chars]
