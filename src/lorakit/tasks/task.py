"""``Task``: one synthetic, seeded text task — a generator of rows plus its scoring rule.

Train and eval rows never share an input: the input string is hashed (stable across processes and
machines, unlike ``hash()``) and one fifth of the input space belongs to ``eval``. The partition
looks at the input only, not at the task, so an eval input of one task is never a training input of
any task — a model pretrained on the base tasks' train split has not seen the new tasks' eval inputs
either.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError, DataError
from .format import parse_answer

Split = Literal["train", "eval"]
SPLITS: tuple[str, ...] = ("train", "eval")
EVAL_BUCKETS = 5  # 1 bucket in 5 of the input space is eval (20 %)

# A generator draws one (input, output) pair from the rng; it must use no other randomness.
Generator = Callable[[random.Random], tuple[str, str]]


def split_of(inp: str) -> str:
    """Which split an input string belongs to (``"train"`` or ``"eval"``), by a stable hash."""
    digest = hashlib.blake2b(inp.encode("utf-8"), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "big") % EVAL_BUCKETS == 0 else "train"


@dataclass(frozen=True)
class Task:
    """A built-in task.

    Attributes:
        name: registry key, e.g. ``"rev"``.
        description: one line for humans.
        instruction: the word the prompt starts with (the model's only cue to which task it is).
        base: True for the tasks the embedded model was pretrained on; False for the new ones.
        generate: draws one ``(input, output)`` pair from a ``random.Random``.
    """

    name: str
    description: str
    instruction: str
    base: bool
    generate: Generator

    def __post_init__(self) -> None:
        if not self.name or not self.name.isidentifier():
            raise ConfigError(f"task name {self.name!r} must be a non-empty identifier")
        if not self.instruction or any(c in self.instruction for c in " =\n"):
            raise ConfigError(f"task {self.name!r}: instruction {self.instruction!r} must be one word")

    def examples(self, n: int, seed: int = 0, split: Split = "train") -> list[dict[str, str]]:
        """``n`` rows ``{"instruction", "input", "output"}`` of ``split``, the same for the same seed.

        Rows are drawn independently (a row can repeat within one call); every row's input belongs to
        ``split`` (see :func:`split_of`), so the two splits never overlap.
        """
        if split not in SPLITS:
            raise ConfigError(f"split {split!r} is not one of {SPLITS}; use 'train' or 'eval'")
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"n={n!r} must be a non-negative int (the number of rows to draw)")
        # A string seed is hashed with SHA-512 by random.Random: deterministic across runs and
        # processes, and different for each (task, split, seed).
        rng = random.Random(f"{self.name}/{split}/{seed}")
        rows: list[dict[str, str]] = []
        # Rejection sampling: ~80 % of draws land in train, ~20 % in eval; the cap only guards
        # against a generator whose inputs all fall in the other split.
        for _ in range(100 * n + 1000):
            if len(rows) == n:
                return rows
            inp, out = self.generate(rng)
            if split_of(inp) == split:
                rows.append({"instruction": self.instruction, "input": inp, "output": out})
        if len(rows) == n:
            return rows
        raise DataError(f"task {self.name!r} could not draw {n} {split!r} rows; its input space is too small")

    def score(self, prediction: str, row: Mapping) -> bool:
        """Exact match: the prediction's first line, stripped, equals the row's output, stripped."""
        if "output" not in row:
            raise DataError(f"task {self.name!r}: row {dict(row)!r} has no 'output' to score against")
        return parse_answer(prediction) == str(row["output"]).strip()
