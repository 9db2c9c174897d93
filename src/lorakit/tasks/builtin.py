"""The built-in tasks: four base tasks the embedded model was pretrained on, seven new ones it was not.

All tasks draw strings over lowercase letters ``a``–``z`` and digits, so every character a new task
uses was seen during pretraining (its embedding is trained) — only the *mapping* is new, which is what
a LoRA adapter on the frozen model has to learn. Letter strings are 3–8 characters long, numbers have
two digits: prompts stay under ~20 characters.
"""

from __future__ import annotations

import random
import string

from .task import Task

LETTERS = string.ascii_lowercase
MIN_LEN, MAX_LEN = 3, 8


def _word(rng: random.Random, alphabet: str = LETTERS, lo: int = MIN_LEN, hi: int = MAX_LEN) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _subset(rng: random.Random, k_lo: int, k_hi: int) -> str:
    """A few distinct letters, so that words drawn from them repeat letters (count, dedup)."""
    return "".join(rng.sample(LETTERS, rng.randint(k_lo, k_hi)))


# --- base tasks -------------------------------------------------------------------------------


def _copy(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, w


def _rev(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, w[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, "".join(sorted(w))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a} {b}", str(a + b)


# --- new tasks --------------------------------------------------------------------------------


def _shift(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in w)


def _count(rng: random.Random) -> tuple[str, str]:
    letters = _subset(rng, 2, 4)
    w = _word(rng, letters)
    target = rng.choice(letters)
    return f"{target} {w}", str(w.count(target))


def _max(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, string.digits)
    return w, max(w)


def _sub(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(10, 99)
    b = rng.randint(10, a)
    return f"{a} {b}", str(a - b)


def _dedup(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, _subset(rng, 2, 5), lo=4)
    return w, "".join(dict.fromkeys(w))


def _swap(rng: random.Random) -> tuple[str, str]:
    w = "".join(rng.choice(LETTERS) for _ in range(2 * rng.randint(2, 4)))  # even length 4, 6 or 8
    return w, "".join(w[i + 1] + w[i] for i in range(0, len(w), 2))


def _rotl(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, w[1:] + w[0]


BUILTIN_TASKS: tuple[Task, ...] = (
    Task("copy", "repeat the letters", "copy", True, _copy),
    Task("rev", "reverse the letters", "rev", True, _rev),
    Task("sort", "sort the letters alphabetically", "sort", True, _sort),
    Task("add", "add two 2-digit numbers", "add", True, _add),
    # New tasks, roughly easiest first for a LoRA on the frozen base (docs/EMBEDDED.md has figures):
    # a study that takes the first k of names("new") gets tasks that a short run can learn.
    Task("shift", "replace each letter by the next one (z -> a)", "shift", False, _shift),
    Task("max", "the largest digit", "max", False, _max),
    Task("swap", "swap each pair of neighbouring letters", "swap", False, _swap),
    Task("rotl", "move the first letter to the end", "rotl", False, _rotl),
    Task("sub", "subtract two 2-digit numbers (first >= second)", "sub", False, _sub),
    Task("dedup", "drop repeated letters, keep first occurrences", "dedup", False, _dedup),
    Task("count", "how many times the first letter occurs in the rest (hard)", "count", False, _count),
)

# The task `lorakit train` fine-tunes on by default: a per-character mapping on top of the base
# model's copy skill, so a short LoRA run takes it from ~0 % to near 100 %.
DEFAULT_TASK = "shift"
