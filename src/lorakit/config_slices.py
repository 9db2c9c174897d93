"""``LoraConfig.fused_slices``: which output slices of a fused projection get LoRA (validated here).

    fused_slices={"c_attn": [True, False, True]}                        # GPT-2: q and v, not k
    fused_slices={"qkv_proj": [True, False, True]}                      # Phi-3 (q, k, v of equal size)
    fused_slices={"query_key_value": {"enable": [True, False, True], "heads": 16}}   # GPT-NeoX

A key names modules as ``target_modules`` does (exact path or ``.name`` suffix) and must be among the
targets; ``enable`` has one bool per fused block; ``heads`` > 1 means the blocks repeat per attention
head (GPT-NeoX's (heads, 3, head_dim) rows). See ``lorakit/adapter_kinds/sliced.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class FusedSlices:
    enable: list[bool]
    heads: int = 1


def normalize_fused_slices(value: Any, target_modules: Any) -> dict[str, FusedSlices]:
    """Check ``fused_slices`` and return ``{name: FusedSlices}``; errors name the entry and the fix."""
    if not value:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"fused_slices={value!r}: use a mapping {{module name: [True, False, True]}}.")
    out = {}
    for name, spec in value.items():
        where = f"fused_slices[{name!r}]"
        if not isinstance(name, str) or not name:
            raise ConfigError(f"fused_slices key {name!r}: use a module name such as 'c_attn'.")
        if isinstance(spec, FusedSlices):
            enable, heads = spec.enable, spec.heads
        elif isinstance(spec, Mapping):
            unknown = sorted(set(spec) - {"enable", "heads"})
            if unknown:
                raise ConfigError(f"{where}: unknown keys {unknown}; use {{'enable': [...], 'heads': n}}.")
            enable, heads = spec.get("enable"), spec.get("heads", 1)
        else:
            enable, heads = spec, 1
        if isinstance(enable, (str, bytes)) or not isinstance(enable, (list, tuple)) or not enable \
                or not all(isinstance(e, bool) for e in enable):
            raise ConfigError(f"{where}: enable={enable!r} must be a non-empty list of booleans, one per fused "
                              "block, e.g. [True, False, True] for q, k, v.")
        if not any(enable):
            raise ConfigError(f"{where}: enable={list(enable)} adapts no slice; set at least one entry to True "
                              "(or drop the module from fused_slices).")
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ConfigError(f"{where}: heads={heads!r} must be an integer ≥ 1 (1 unless q/k/v repeat per head).")
        if isinstance(target_modules, list) and not any(
                name == t or name.endswith("." + t) or t.endswith("." + name) for t in target_modules):
            raise ConfigError(f"{where}: {name!r} is not among target_modules {target_modules}; add it there "
                              "too (fused_slices only says how a targeted module is adapted).")
        out[name] = FusedSlices(list(enable), heads)
    return out
