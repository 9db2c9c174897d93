"""Look built-in tasks up by name."""

from __future__ import annotations

import difflib
from typing import Literal

from ..errors import ConfigError
from .builtin import BUILTIN_TASKS
from .task import Task

_REGISTRY: dict[str, Task] = {t.name: t for t in BUILTIN_TASKS}


def names(kind: Literal["all", "base", "new"] = "all") -> list[str]:
    """Task names in registry order: all of them, only the base tasks, or only the new ones."""
    if kind not in ("all", "base", "new"):
        raise ConfigError(f"kind={kind!r} must be 'all', 'base' or 'new'")
    return [t.name for t in BUILTIN_TASKS if kind == "all" or t.base == (kind == "base")]


def get(name: str | Task) -> Task:
    """The built-in task called ``name`` (a ``Task`` is passed through); a typo lists the known names."""
    if isinstance(name, Task):
        return name
    task = _REGISTRY.get(name) if isinstance(name, str) else None
    if task is None:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown task {name!r}; {hint}known tasks: {', '.join(_REGISTRY)}")
    return task
