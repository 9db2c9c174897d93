"""Where lorakit keeps its bookkeeping on a model: the adapters' configs, which are active and which
train — and the two functions that act on it for everyone (``activate``, ``refresh_trainable``).

The record lives in the root module's ``__dict__`` (not a buffer or parameter), so it never enters
the model's state dict and disappears with ``merge_and_unload`` / ``unload``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import AdapterNotFoundError, ConfigError
from .layers.host import LoraLayer
from .layers.saved import TrainableCopies

_KEY = "_lorakit"


@dataclass
class AdapterRecord:
    config: Any  # LoraConfig or a variant's config
    trainable: bool = True
    kind: str = "lora"  # the adapter kind's name in lorakit.adapter_kinds.ADAPTER_KINDS


@dataclass
class ModelState:
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


def require_module(model: nn.Module) -> None:
    """A ConfigError for a model that is not an ``nn.Module`` (None, a path, a pipeline object)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__} ({model!r:.60}); load it "
                          "first, e.g. transformers.AutoModelForCausalLM.from_pretrained(path).")


def model_state(model: nn.Module, create: bool = False) -> ModelState | None:
    require_module(model)  # every public call reads the state or walks the layers first: one check for all
    st = model.__dict__.get(_KEY)
    if st is None and create:
        st = ModelState()
        model.__dict__[_KEY] = st
    return st


def clear_state(model: nn.Module) -> None:
    model.__dict__.pop(_KEY, None)


def require_adapter(model: nn.Module, name: str) -> AdapterRecord:
    st = model_state(model)
    if not isinstance(name, str):  # a list or None would reach ``name in dict`` (TypeError: unhashable)
        raise ConfigError(f"adapter name {name!r:.60}: must be a string (got a {type(name).__name__}).")
    if st is None or not st.adapters:
        raise AdapterNotFoundError(
            f"the model has no lorakit adapters (looked for {name!r}); add one with lorakit.inject or "
            "lorakit.load_adapter first."
        )
    if name not in st.adapters:
        raise AdapterNotFoundError(f"no adapter named {name!r}; the model has {sorted(st.adapters)}.")
    return st.adapters[name]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    require_module(model)
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield path, module


def layer_adapters(model: nn.Module, name: str, adapter_type: type) -> list[tuple[str, LoraLayer, nn.Module]]:
    """(path, layer, adapter) for each LoRA layer whose adapter ``name`` is an ``adapter_type`` — a
    list, so the caller may remove adapters while walking it."""
    out = []
    for path, host in lora_layers(model):
        adapter = host.lora[name] if name in host.lora else None
        if isinstance(adapter, adapter_type):
            out.append((path, host, adapter))
    return out


def trainable_copies(model: nn.Module) -> Iterator[tuple[str, TrainableCopies]]:
    require_module(model)
    for path, module in model.named_modules():
        if isinstance(module, TrainableCopies):
            yield path, module


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def activate(model: nn.Module, names: Sequence[str]) -> None:
    """Make ``names`` (already checked) the active adapters on every layer, then refresh training."""
    st = model_state(model)
    st.active = list(names)
    for _, host in lora_layers(model):
        host.active = tuple(n for n in names if n in host.lora)
    for _, host in trainable_copies(model):
        # A full copy cannot be summed: the first active adapter that owns one wins.
        host.active = next((n for n in names if n in host.modules_to_save), None)
    refresh_trainable(model)


def merged_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters merged into the base weights of at least one layer, in merge order."""
    out: dict[str, None] = {}
    for _, host in lora_layers(model):
        out.update(dict.fromkeys(host.merged))
    return list(out)


def unmerge_to_switch(model: nn.Module, names: Sequence[str], stacklevel: int = 3) -> None:
    """PEFT's rule when the active adapters change (its ``set_adapter``): merged updates are taken out
    of the base weights first, with a warning, so the model then runs exactly the active adapters.
    Call it after every check of the switching call has passed: it changes weights in place."""
    merged = merged_adapters(model)
    if not merged:
        return
    warnings.warn(f"adapters {merged} are merged into the base weights; activating {list(names)} unmerges them "
                  "first (as PEFT's set_adapter does). Call lorakit.merge(model) again after switching to merge "
                  "the new active adapters.", UserWarning, stacklevel=stacklevel)
    for _, host in lora_layers(model):
        host.unmerge()


# Parameters that belong to adapters or to modules_to_save copies, not to the base model.
_INTERNAL = re.compile(r"\.(lora|original_module|modules_to_save)\.")


def refresh_trainable(model: nn.Module) -> None:
    """Freeze everything, then unfreeze what the trainable adapters own (their parameters, their
    ``modules_to_save`` copies and the biases their ``bias`` mode names) — the same for every kind."""
    st = model_state(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if st is None:
        return
    trainable = {n for n, rec in st.adapters.items() if rec.trainable}
    for _, host in lora_layers(model):
        for name, adapter in host.lora.items():
            if name in trainable:
                for p in adapter.parameters():
                    p.requires_grad_(True)
    for _, host in trainable_copies(model):
        for name, copy in host.modules_to_save.items():
            if name in trainable:
                for p in copy.parameters():
                    p.requires_grad_(True)
    for name in trainable:
        bias = getattr(st.adapters[name].config, "bias", "none")
        for p in bias_parameters(model, bias, name).values():
            p.requires_grad_(True)


def bias_parameters(model: nn.Module, bias: str, adapter_name: str) -> dict[str, nn.Parameter]:
    """The biases an adapter trains and saves: none, all, or those of its adapted layers."""
    if bias == "none":
        return {}
    if bias == "all":
        return {n: p for n, p in model.named_parameters()
                if n.endswith("bias") and not _INTERNAL.search(n)}
    out = {}
    for path, host in lora_layers(model):
        b = host.kind.bias(host.base_layer)
        if adapter_name in host.lora and isinstance(b, nn.Parameter):
            out[f"{path}.base_layer.bias"] = b
    return out
