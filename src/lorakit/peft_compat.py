"""Reading and writing configs so that PEFT and lorakit agree on what a file means.

* :func:`present_names` — a PEFT file is read leniently: names in ``target_modules`` /
  ``modules_to_save`` that match no module are dropped (PEFT's SEQ_CLS task adds both
  ``"classifier"`` and ``"score"`` whatever the model has). A user's own config stays strict at
  :func:`lorakit.inject`. The config that is kept records the names that matched.
* :func:`portable_patterns` — when rank/alpha pattern keys overlap on adapted modules, the file gets
  one exact key per module instead, so PEFT (first key in the file's sorted order wins) and lorakit
  (most specific key wins) read the same values.
"""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from .config import LoraConfig, pattern_key, pattern_overlaps
from .inject import candidate_modules


def _matches(name: str, paths: list[str]) -> bool:
    return any(p == name or p.endswith("." + name) for p in paths)


def present_names(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``config`` with the list names that match no module of ``model`` removed (see module doc).

    Target lists that would become empty are left as they are, so injection reports the problem."""
    paths = [p for p, _ in candidate_modules(model)]
    changes = {}
    if isinstance(config.target_modules, list):
        kept = [n for n in config.target_modules if _matches(n, paths)]
        if kept and kept != config.target_modules:
            changes["target_modules"] = kept
    if config.modules_to_save:
        kept = [n for n in config.modules_to_save if _matches(n, paths)]
        if kept != config.modules_to_save:
            changes["modules_to_save"] = kept or None
    return dataclasses.replace(config, **changes) if changes else config


def portable_patterns(config: LoraConfig, paths: list[str]) -> dict[str, dict]:
    """``{"rank_pattern": ..., "alpha_pattern": ...}`` to write for the adapted module ``paths``:
    unchanged when no key overlaps another on an adapted module, else one anchored exact-path key
    (``^model\\.layers\\.1\\.q_proj$``) per module whose value differs from the default."""
    out = {}
    for field_name, default in (("rank_pattern", config.r), ("alpha_pattern", config.lora_alpha)):
        patterns = getattr(config, field_name)
        if not pattern_overlaps(patterns, paths):
            out[field_name] = dict(patterns)
            continue
        explicit = {}
        for path in sorted(paths):
            key = pattern_key(patterns, path)
            if key is not None and patterns[key] != default:
                explicit[f"^{re.escape(path)}$"] = patterns[key]
        out[field_name] = explicit
    return out
