"""AdaLoRA's errors (defined in the core family, ``lorakit.errors``, next to the adapter kind)."""

from ...errors import AdaLoraBudgetError, AdaLoraScheduleError, RankPatternError

__all__ = ["AdaLoraBudgetError", "AdaLoraScheduleError", "RankPatternError"]
