"""AdaLoRA's errors: each is a ``LorakitError`` (through the core family) and names the fix."""

from __future__ import annotations

from ...errors import AdapterFileError, ConfigError


class AdaLoraBudgetError(ConfigError):
    """The target rank budget is above the initial one (nothing could be pruned)."""


class AdaLoraScheduleError(ConfigError):
    """``total_step`` is missing, or too short to hold the warm-ups ``tinit + tfinal``."""


class RankPatternError(AdapterFileError):
    """A saved ``rank_pattern`` does not fit the model (unknown module, wrong length, rank > init_r)."""
