"""The adapter kinds lorakit knows: a static table, read by ``inject`` and the adapter-file path.

Each kind is one small file (an ``Adapter`` module + an ``AdapterKind`` description; the protocol is
``lorakit.layers.protocol``). Order matters: the first kind that accepts a config (``inject`` without
``kind=``) or an ``adapter_config.json`` (``load_adapter``) wins, so a more specific kind (e.g. DoRA:
a ``LoraConfig`` with ``use_dora``) goes before plain LoRA. Adding a kind = adding its file and one
entry here; nothing registers itself at import time.
"""

from __future__ import annotations

from typing import Any

from ..errors import AdapterFileError, AdapterNotFoundError, ConfigError
from ..layers.protocol import Adapter, AdapterKind
from .adalora import ADALORA
from .dora import DORA
from .loha import LOHA
from .lokr import LOKR
from .lora import LORA
from .olora import OLORA
from .sliced import SLICED

ADAPTER_KINDS: tuple[AdapterKind, ...] = (ADALORA, OLORA, SLICED, DORA, LORA, LOHA, LOKR)


def adapter_kind(name: str) -> AdapterKind:
    """The kind called ``name`` (the ``kind`` recorded for an adapter on a model)."""
    for kind in ADAPTER_KINDS:
        if kind.name == name:
            return kind
    raise AdapterNotFoundError(f"unknown adapter kind {name!r}; lorakit knows {', '.join(k.name for k in ADAPTER_KINDS)}.")


def kind_for_config(config: Any) -> AdapterKind:
    for kind in ADAPTER_KINDS:
        if kind.accepts_config(config):
            return kind
    types = sorted({k.config_type.__name__ for k in ADAPTER_KINDS})
    raise ConfigError(f"config must be one of {', '.join(types)} (lorakit.LoraConfig for LoRA), "
                      f"got {type(config).__name__}.")


def kind_for_file(raw: dict, source: str) -> AdapterKind:
    for kind in ADAPTER_KINDS:
        if kind.accepts_file(raw):
            return kind
    readable = sorted({k.peft_type for k in ADAPTER_KINDS})
    raise AdapterFileError(f"{source}: peft_type {raw.get('peft_type')!r} is not supported; lorakit reads "
                           f"{', '.join(readable)} adapters.")


__all__ = ["ADAPTER_KINDS", "Adapter", "AdapterKind", "adapter_kind", "kind_for_config", "kind_for_file"]
