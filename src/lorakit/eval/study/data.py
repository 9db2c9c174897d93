"""The study's data, all built from things that ship with Python, none hand-written for training.

* **Target skill** — the official Unicode name of an accented Latin letter ("é" → "Latin Small Letter E
  With Acute"), from the standard library's ``unicodedata`` tables. The answer composes a base letter
  and a diacritic by a fixed grammar, so rows held out of training can be answered by a model that
  learned the skill, not only by one that memorised its rows. SmolLM2-135M-Instruct does not know it
  (0 % exact match before training).
* **Real text for held-out perplexity** — the docstrings of standard-library modules (English technical
  prose), cut into fixed-length token blocks. Nothing in the study trains on it.
* **General chat prompts** — a fixed set of everyday questions (the issue's "capital of France" among
  them); the base model's own greedy answers to them are the reference for agreement and KL. They are
  evaluation prompts only, never training rows (self-replay writes its own prompts, Magpie-style).
"""

from __future__ import annotations

import importlib
import inspect
import random
import unicodedata

# Latin-1 Supplement, Latin Extended-A/B, Latin Extended Additional: the precomposed accented letters.
_RANGES = ((0x00C0, 0x0250), (0x1E00, 0x1F00))

QUESTION = "What is the Unicode name of the character {char}?"


def unicode_name_rows() -> list[dict[str, str]]:
    """Instruction rows ``{"instruction", "output"}`` for every precomposed Latin letter with a diacritic
    (506 rows with Python 3.11's tables), in code-point order."""
    rows = []
    for lo, hi in _RANGES:
        for cp in range(lo, hi):
            ch = chr(cp)
            name = unicodedata.name(ch, "")
            # "LATIN SMALL LETTER E WITH ACUTE": a letter + diacritic(s) that decomposes canonically.
            if name.startswith("LATIN") and " WITH " in name and unicodedata.decomposition(ch):
                rows.append({"instruction": QUESTION.format(char=ch), "output": name.title()})
    return rows


def split_rows(rows: list[dict], n_held_out: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held_out): ``n_held_out`` rows drawn at random (fixed ``seed``) are never trained on."""
    if not 0 < n_held_out < len(rows):
        raise ValueError(f"n_held_out={n_held_out} must be between 1 and {len(rows) - 1}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_held_out])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


DOC_MODULES = ("json", "textwrap", "argparse", "collections", "functools", "pathlib", "random", "statistics",
               "string", "heapq", "bisect", "contextlib", "dataclasses", "difflib", "fractions", "csv",
               "calendar", "logging", "shutil", "tempfile", "zipfile", "unittest", "fnmatch", "glob")


def docstring_text(modules: tuple[str, ...] = DOC_MODULES) -> str:
    """The module docstrings of ``modules`` and of their public functions and classes, joined."""
    parts: list[str] = []
    for name in modules:
        mod = importlib.import_module(name)
        doc = inspect.getdoc(mod)
        if doc:
            parts.append(doc)
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                d = inspect.getdoc(obj)
                if d and len(d) > 80:
                    parts.append(d)
    return "\n\n".join(parts)


def text_blocks(token_ids: list[int], block: int, n_blocks: int) -> list[list[int]]:
    """``n_blocks`` blocks of ``block`` tokens, spread evenly over ``token_ids`` (no overlap)."""
    total = len(token_ids) // block
    if total < n_blocks:
        raise ValueError(f"the text has {total} blocks of {block} tokens; asked for {n_blocks}")
    stride = total // n_blocks
    return [token_ids[i * stride * block:(i * stride + 1) * block] for i in range(n_blocks)]


CHAT_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "What is 12 times 7?",
    "Write a haiku about the sea.",
    "Who wrote Romeo and Juliet?",
    "Explain in one sentence what a CPU does.",
    "What is the boiling point of water in Celsius?",
    "Translate 'good morning' into Spanish.",
    "Name three primary colors.",
    "How many days are there in a leap year?",
    "What is photosynthesis?",
    "Suggest a name for a pet goldfish.",
    "What is the largest planet in our solar system?",
    "Why is the sky blue?",
    "Write a short greeting for a birthday card.",
    "What does HTML stand for?",
)
