"""Several adapters on one pipeline at once, each with a weight (a style + a character), and merging
them into the pipeline's weights and back.

The weight w of an adapter multiplies its update: ΔW_total = Σ_i w_i · ΔW_i — what A1111's
``<lora:name:w>``, ComfyUI's ``strength_model`` and diffusers' ``set_adapters(..., weights)`` do. It
is applied by scaling each adapter's ``scaling`` (its base value is kept in ``base_scaling``, so files
saved afterwards still hold the adapter's own α).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from .. import adapters as lifecycle
from ..errors import AdapterNotFoundError, AdapterStateError, ConfigError
from ..state import lora_layers, model_state
from .components import components_of


def _owners(pipe: Any, name: str) -> dict[str, nn.Module]:
    found = {c: m for c, m in components_of(pipe).items()
             if model_state(m) is not None and name in model_state(m).adapters}
    if not found:
        raise AdapterNotFoundError(f"no component of the pipeline holds an adapter named {name!r}; load it first "
                                   "(load_kohya / load_diffusers / add_adapter).")
    return found


def set_adapters(pipe: Any, names: str | Sequence[str], weights: float | Sequence[float] | None = None) -> None:
    """Activate ``names`` together (their updates add) with per-adapter ``weights`` (default 1.0)."""
    names = [names] if isinstance(names, str) else list(names)
    if weights is None:
        weights = [1.0] * len(names)
    elif isinstance(weights, (int, float)):
        weights = [float(weights)] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise ConfigError(f"set_adapters: {len(names)} names but {len(weights)} weights; give one weight per name.")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"set_adapters: weight {w!r} must be a finite number (e.g. 0.8).")
    for n in names:
        _owners(pipe, n)
    comps = components_of(pipe)
    if any(h.merged for m in comps.values() for _, h in lora_layers(m)):
        raise AdapterStateError("set_adapters: some adapters are merged into the weights; call unmerge(pipe) first.")
    for module in comps.values():
        st = model_state(module)
        if st is None:
            continue
        here = [n for n in names if n in st.adapters]
        for _, host in lora_layers(module):
            for n, w in zip(names, weights):
                if n in host.lora:
                    ad = host.lora[n]
                    base = getattr(ad, "base_scaling", ad.scaling)
                    ad.base_scaling = base
                    ad.scaling = base * float(w)
        lifecycle.set_adapter(module, here)
        if not here:  # nothing of this adapter set lives here: run this component as its base
            for _, host in lora_layers(module):
                host.active = ()


def merge(pipe: Any, names: Sequence[str] | None = None) -> None:
    """Add the active adapters' weighted updates (or those of ``names``) into the pipeline's weights."""
    for module in components_of(pipe).values():
        st = model_state(module)
        if st is None:
            continue
        own = None if names is None else [n for n in names if n in st.adapters]
        if own != []:
            lifecycle.merge(module, own)


def unmerge(pipe: Any) -> None:
    """Subtract every merged update again (the base weights come back up to rounding)."""
    for module in components_of(pipe).values():
        if model_state(module) is not None:
            lifecycle.unmerge(module)


def merge_and_unload(pipe: Any) -> dict[str, nn.Module]:
    """Merge the active adapters and put the plain modules back (a pipeline with no lorakit in it)."""
    out = {}
    for comp, module in components_of(pipe).items():
        if model_state(module) is not None:
            lifecycle.merge_and_unload(module)
        out[comp] = module
    return out
