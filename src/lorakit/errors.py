"""One exception family for everything lorakit rejects.

Every message names the offending thing (a module path, a file, a field, a row) and says how to fix
it. Catch ``LorakitError`` to handle them all; the subclasses also derive from the matching builtin
(``ValueError``, ``KeyError``, ...) so generic handlers keep working.
"""

from __future__ import annotations


class LorakitError(Exception):
    """Base class of all errors raised by lorakit on bad input or bad state."""


class ConfigError(LorakitError, ValueError):
    """A configuration field has an invalid value."""


class TargetNotFoundError(LorakitError, ValueError):
    """A ``target_modules`` entry matched no module of the model."""


class UnsupportedModuleError(LorakitError, TypeError):
    """A targeted module is of a type lorakit cannot adapt."""


class AdapterNotFoundError(LorakitError, KeyError):
    """An adapter name that the model does not have."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class AdapterStateError(LorakitError, RuntimeError):
    """An operation that the adapters' current state does not allow (e.g. merging twice into int4)."""


class AdapterFileError(LorakitError, ValueError):
    """An adapter file or directory that cannot be read or does not fit the model."""


class QuantizationError(LorakitError, ValueError):
    """Unsupported dtype, blocksize or layout for quantization, or a checkpoint that does not fit."""


class DataError(LorakitError, ValueError):
    """A dataset file or row that does not have the expected schema."""


class CheckpointError(LorakitError, RuntimeError):
    """A training checkpoint that is missing, incomplete or does not fit the run."""


class TrainingError(LorakitError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss)."""


class AdaLoraBudgetError(ConfigError):
    """AdaLoRA: the target rank budget is above the initial one (nothing could be pruned)."""


class AdaLoraScheduleError(ConfigError):
    """AdaLoRA: ``total_step`` is missing, or too short to hold the warm-ups ``tinit + tfinal``."""


class RankPatternError(AdapterFileError):
    """AdaLoRA: a saved ``rank_pattern`` does not fit the model (unknown module, wrong length, rank > init_r)."""


class OutputError(LorakitError, OSError):
    """A file or directory lorakit must write cannot be written (disk full, read-only, no permission),
    or an output directory another run is using."""


class ScorerError(ConfigError):
    """An eval scorer spec (``scorer=...``) that cannot be used: unknown name, bad regex, a module or
    file that does not load, a name that is not a function, a function that returns no score."""
