"""``modules_to_save``: modules trained in full next to an adapter (e.g. a classification head).

The original module stays frozen; each adapter gets its own trainable copy, and the active adapter
selects which one runs. Attribute names follow PEFT (``original_module``, ``modules_to_save``) so the
model's state-dict keys match PEFT's.
"""

from __future__ import annotations

import copy

from torch import nn

from .saved_rows import per_row_forward

_OWN = frozenset({"original_module", "modules_to_save", "active", "disabled", "row_adapters"})


class TrainableCopies(nn.Module):
    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.row_adapters: list[str | None] | None = None  # per-row selection, set by a context

    def add_copy(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def current(self) -> nn.Module:
        if self.disabled or self.active is None or self.active not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active]

    def forward(self, *args, **kwargs):
        if self.row_adapters is not None and not self.disabled:
            return per_row_forward(self, self.row_adapters, *args, **kwargs)
        return self.current()(*args, **kwargs)

    def __getattr__(self, name):
        # Let code that reads e.g. ``model.score.weight`` or ``.out_features`` keep working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in _OWN:
                raise
            return getattr(self.current(), name)
