"""Where lorakit keeps its bookkeeping on a model: the adapters' configs and which are trainable.

The record lives in the root module's ``__dict__`` (not a buffer or parameter), so it never enters
the model's state dict and disappears with ``merge_and_unload`` / ``unload``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import AdapterNotFoundError
from .layers.host import LoraLayer
from .layers.saved import TrainableCopies

_KEY = "_lorakit"


@dataclass
class AdapterRecord:
    config: Any  # LoraConfig or a variant's config
    trainable: bool = True
    kind: str = "lora"  # "lora", "adalora", "olora", ...


@dataclass
class ModelState:
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


def model_state(model: nn.Module, create: bool = False) -> ModelState | None:
    st = model.__dict__.get(_KEY)
    if st is None and create:
        st = ModelState()
        model.__dict__[_KEY] = st
    return st


def clear_state(model: nn.Module) -> None:
    model.__dict__.pop(_KEY, None)


def require_adapter(model: nn.Module, name: str) -> AdapterRecord:
    st = model_state(model)
    if st is None or not st.adapters:
        raise AdapterNotFoundError(
            f"the model has no lorakit adapters (looked for {name!r}); add one with lorakit.inject or "
            "lorakit.load_adapter first."
        )
    if name not in st.adapters:
        raise AdapterNotFoundError(f"no adapter named {name!r}; the model has {sorted(st.adapters)}.")
    return st.adapters[name]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield path, module


def trainable_copies(model: nn.Module) -> Iterator[tuple[str, TrainableCopies]]:
    for path, module in model.named_modules():
        if isinstance(module, TrainableCopies):
            yield path, module


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)
