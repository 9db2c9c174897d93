"""The training loop's hook protocol lives in ``lorakit.hooks`` (below variants, so a variant can
provide a hook without importing the training package); re-exported here for the loop's callers."""

from ..hooks import BaseHook, HookContext, TrainHook

__all__ = ["BaseHook", "HookContext", "TrainHook"]
