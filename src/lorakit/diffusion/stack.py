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
from .._txn import restore, snapshot
from ..errors import AdapterNotFoundError, AdapterStateError, ConfigError
from ..state import lora_layers, model_state
from ..tied import check_merge_untied
from ..validate import check_bool
from .components import components_of


def _owners(pipe: Any, name: str) -> dict[str, nn.Module]:
    found = {c: m for c, m in components_of(pipe).items()
             if model_state(m) is not None and name in model_state(m).adapters}
    if not found:
        raise AdapterNotFoundError(f"no component of the pipeline holds an adapter named {name!r}; load it first "
                                   "(load_kohya / load_diffusers / add_adapter).")
    return found


def _name_list(pipe: Any, names: Any, caller: str) -> list[str]:
    """One adapter name or a list of them, each held by some component; checked before any change."""
    if isinstance(names, str):
        names = [names]
    elif isinstance(names, Sequence):
        names = list(names)
    else:  # a bare 3 / None was a TypeError; a str iterated as characters merged nothing
        raise ConfigError(f"{caller}: names={names!r:.60} must be an adapter name or a list of names "
                          "(e.g. ['style', 'character']).")
    for n in names:
        if not isinstance(n, str):
            raise ConfigError(f"{caller}: adapter name {n!r:.60} must be a string.")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # its weight would be applied twice
        raise ConfigError(f"{caller}: {twice} listed more than once; name each adapter once.")
    for n in names:
        _owners(pipe, n)
    return names


def set_adapters(pipe: Any, names: str | Sequence[str], weights: float | Sequence[float] | None = None) -> None:
    """Activate ``names`` together (their updates add) with per-adapter ``weights`` (default 1.0)."""
    names = _name_list(pipe, names, "set_adapters")
    if weights is None:
        weights = [1.0] * len(names)
    elif isinstance(weights, (int, float)) and not isinstance(weights, bool):
        weights = [float(weights)] * len(names)
    elif isinstance(weights, Sequence) and not isinstance(weights, str):
        weights = list(weights)
    else:
        raise ConfigError(f"set_adapters: weights={weights!r:.60} must be a number or a list of numbers, one per name.")
    if len(weights) != len(names):
        raise ConfigError(f"set_adapters: {len(names)} names but {len(weights)} weights; give one weight per name.")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"set_adapters: weight {w!r} must be a finite number (e.g. 0.8).")
    comps = components_of(pipe)
    if any(h.merged for m in comps.values() for _, h in lora_layers(m)):
        raise AdapterStateError("set_adapters: some adapters are merged into the weights; call unmerge(pipe) first.")
    snaps = [snapshot(m) for m in comps.values()]  # scalings and active lists of every component
    try:
        for module in comps.values():
            _set_here(module, names, weights)
    except BaseException:
        for snap in snaps:
            restore(snap)
        raise


def _set_here(module: nn.Module, names: list[str], weights: list[float]) -> None:
    st = model_state(module)
    if st is None:
        return
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


def merge(pipe: Any, names: str | Sequence[str] | None = None, safe_merge: bool = False) -> None:
    """Add the active adapters' weighted updates (or those of ``names``) into the pipeline's weights.

    All components or none: every refusal (an unknown name, a tied weight, a quantized base that cannot
    be merged in place, with ``safe_merge`` an update that would make a weight inf/NaN) comes before the
    first weight of any component changes."""
    check_bool("safe_merge", safe_merge)
    names = None if names is None else _name_list(pipe, names, "merge")
    work = []
    for module in components_of(pipe).values():
        st = model_state(module)
        if st is None:
            continue
        own = list(st.active) if names is None else [n for n in names if n in st.adapters]
        if own:
            work.append((module, own))
    for module, own in work:
        check_merge_untied(module, own)
        if safe_merge:
            for _, host in lora_layers(module):
                host.check_merge([n for n in own if n in host.lora])
    # a component with a layer that refuses in-place merges raises in lifecycle.merge before writing: first
    work.sort(key=lambda item: all(getattr(h.kind, "in_place", True) for _, h in lora_layers(item[0])))
    for module, own in work:
        lifecycle.merge(module, own)


def unmerge(pipe: Any) -> None:
    """Subtract every merged update again (the base weights come back up to rounding)."""
    for module in components_of(pipe).values():
        if model_state(module) is not None:
            lifecycle.unmerge(module)


def merge_and_unload(pipe: Any) -> dict[str, nn.Module]:
    """Merge the active adapters and put the plain modules back (a pipeline with no lorakit in it)."""
    merge(pipe)  # all components or none; what follows only swaps modules
    out = {}
    for comp, module in components_of(pipe).items():
        if model_state(module) is not None:
            lifecycle.merge_and_unload(module)
        out[comp] = module
    return out
