"""Path rules lorakit shares with PEFT 0.21 so that one ``adapter_config.json`` selects the same modules
in both libraries (``peft.tuners.tuners_utils.check_target_module_exists`` holds PEFT's side).

* :func:`layer_index` — which layer a module path belongs to, for ``layers_to_transform``;
* :func:`in_saved_module` — a path equal to or inside a ``modules_to_save`` module is never a LoRA
  target (its trainable copy would hold LoRA layers whose keys neither library can read back).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# No layers_pattern: the FIRST numbered segment that follows a named one ("model.layers.3.mlp" → 3,
# T5's "encoder.block.1.layer.0.SelfAttention.q" → 1, the block, not the sub-layer). A path whose
# layer list sits at the root ("layers.0.q") has no named segment before it: no index (as PEFT).
_FIRST_INDEX = re.compile(r".*?\.[^.]*\.(\d+)\.")


def layer_index(path: str, layers_pattern: Sequence[str] | None) -> int | None:
    """The layer index of module ``path`` (None: not inside a numbered layer).

    With ``layers_pattern`` (names of the layer list, regexes as in PEFT) the first pattern that occurs
    as ``<pattern>.<i>.`` gives ``i`` (its first occurrence); without it, the first numbered segment.
    """
    if not layers_pattern:
        m = _FIRST_INDEX.match(path)
    else:
        m = None
        for pat in layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pat}\.(\d+)\.", path)
            if m:
                break
    return int(m.group(1)) if m else None


def in_saved_module(path: str, modules_to_save: Sequence[str] | None) -> bool:
    """True when ``path`` is a ``modules_to_save`` module or lies inside one (names as PEFT matches
    them: the whole path or a ``.``-suffix, then the end or a ``.``)."""
    return any(re.match(rf"(^|.*\.){name}($|\..*)", path) for name in modules_to_save or ())
