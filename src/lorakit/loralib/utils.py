"""loralib's helpers: ``mark_only_lora_as_trainable`` and ``lora_state_dict``.

Both work on models built from :mod:`lorakit.loralib` layers *and* on models injected with
:func:`lorakit.inject` (there they read one adapter; keys come out in loralib's spelling,
``<path>.lora_A`` / ``<path>.lora_B``, so the dict is a loralib checkpoint). LoRA tensors are found
by module type, never by the substring ``'lora_'`` in a name (loralib's rule also catches any
parameter that happens to contain it); biases are parameters whose own name is ``bias``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..adapter_kinds.lora import LoraAdapter
from ..adapter_kinds.sliced import SlicedAdapter
from ..errors import AdapterNotFoundError, ConfigError, UnsupportedModuleError
from ..inject import refresh_trainable
from ..state import lora_layers, model_state, trainable_copies
from .layers import LoRALayer

BIAS_MODES = ("none", "all", "lora_only")


def _check_bias(bias: str) -> None:
    if bias not in BIAS_MODES:
        raise ConfigError(f"bias={bias!r}: use 'none', 'all' or 'lora_only' (loralib's modes).")


def _compat_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALayer) and m.r > 0]


def _prefix(path: str) -> str:
    return f"{path}." if path else ""


def loralib_name(name: str) -> str | None:
    """A parameter name of a lorakit-injected model in loralib's spelling (None: not a base tensor).
    ``h.0.attn.c_attn.base_layer.bias`` → ``h.0.attn.c_attn.bias``; adapter internals → None."""
    if ".lora." in f".{name}" or ".original_module." in f".{name}" or ".modules_to_save." in f".{name}":
        return None
    return re.sub(r"(^|\.)base_layer\.", r"\1", name)


def _bias_params(model: nn.Module, bias: str) -> dict[str, nn.Parameter]:
    """loralib name → bias parameter, for bias='all' / 'lora_only'."""
    if bias == "none":
        return {}
    out: dict[str, nn.Parameter] = {}
    if bias == "all":
        for name, p in model.named_parameters():
            short = loralib_name(name)
            if short is not None and short.rpartition(".")[2] == "bias":
                out[short] = p
        return out
    for path, layer in _compat_layers(model):
        if layer.bias is not None:
            out[f"{_prefix(path)}bias"] = layer.bias
    for path, host in lora_layers(model):
        b = host.kind.bias(host.base_layer)
        if host.lora and isinstance(b, nn.Parameter):
            out[f"{_prefix(path)}bias"] = b
    return out


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze everything except the LoRA factors (and the biases ``bias`` names).

    ``bias``: ``"none"``; ``"all"`` (every parameter named ``bias``); ``"lora_only"`` (the biases of
    the layers that carry LoRA). On a lorakit-injected model the trainable adapters' factors and
    ``modules_to_save`` copies are what lorakit's own bookkeeping says; ``bias`` adds to that.
    """
    _check_bias(bias)
    if model_state(model) is not None:
        refresh_trainable(model)  # trainable adapters' factors + modules_to_save copies
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    for _, layer in _compat_layers(model):
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    for p in _bias_params(model, bias).values():
        p.requires_grad_(True)


def _export_adapter(model: nn.Module, adapter_name: str | None) -> str | None:
    st = model_state(model)
    if st is None:
        return None
    if adapter_name is not None:
        if adapter_name not in st.adapters:
            raise AdapterNotFoundError(f"no adapter named {adapter_name!r}; the model has {sorted(st.adapters)}.")
        return adapter_name
    if len(st.active) == 1:
        return st.active[0]
    raise ConfigError(
        f"the model has active adapters {st.active}; a loralib checkpoint holds one — pass "
        "adapter_name=... to lora_state_dict."
    )


def lora_state_dict(model: nn.Module, bias: str = "none", adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors a loralib checkpoint holds: ``<path>.lora_A`` / ``<path>.lora_B`` of every LoRA
    layer, the biases ``bias`` names, and (injected models) the adapter's ``modules_to_save`` copies
    under the original module's names (e.g. ``classifier.dense.weight``). Values share storage
    with the model (like ``state_dict()``); ``torch.save`` them, or use :func:`save_lora_state_dict`.
    loralib files carry no α: build the loralib layers with the adapter's ``lora_alpha``."""
    _check_bias(bias)
    out: dict[str, torch.Tensor] = {}
    for path, layer in _compat_layers(model):
        out[f"{_prefix(path)}lora_A"] = layer.lora_A.detach()
        out[f"{_prefix(path)}lora_B"] = layer.lora_B.detach()
    name = _export_adapter(model, adapter_name)
    if name is not None:
        for path, host in lora_layers(model):
            if name not in host.lora:
                continue
            if host.kind.name not in ("linear", "conv1d_gpt2", "embedding"):
                raise UnsupportedModuleError(
                    f"{path}: a {host.kind.name} LoRA layer has no loralib checkpoint form (loralib's conv "
                    "factors are laid out differently); save this adapter with lorakit.save_adapter instead."
                )
            adapter = host.lora[name]
            if not isinstance(adapter, (LoraAdapter, SlicedAdapter)):
                raise UnsupportedModuleError(
                    f"{path}: adapter {name!r} is a {type(adapter).__name__}, not a plain LoRA pair; loralib "
                    "checkpoints hold only lora_A/lora_B. Save it with lorakit.save_adapter instead."
                )
            out[f"{_prefix(path)}lora_A"] = adapter.lora_A.detach()
            out[f"{_prefix(path)}lora_B"] = adapter.lora_B.detach()
        for path, host in trainable_copies(model):
            if name in host.modules_to_save:
                for key, t in host.modules_to_save[name].state_dict().items():
                    out[f"{_prefix(path)}{key}"] = t
    for key, p in _bias_params(model, bias).items():
        out.setdefault(key, p.detach())
    return out
