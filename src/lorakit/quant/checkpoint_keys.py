"""Checkpoint names → model names for the streaming loader, as transformers (≥ 5) maps them at load.

transformers 5 renames some modules against the names their checkpoints carry (GPT-NeoX's ``embed_out``
is the model's ``lm_head``; Mixtral's ``block_sparse_moe`` is ``mlp``), and it stacks an MoE's per-expert
Linears of the checkpoint (``experts.3.w2.weight``, one (hidden, inter) matrix each) into one parameter of
the model (``experts.down_proj``, (experts, hidden, inter)). ``from_pretrained`` applies both with the
model's conversion mapping (``transformers.conversion_mapping``); :class:`CheckpointKeys` applies the same
rules, key by key, so ``load_quantized`` fills such models while it streams:

* a renamed key is placed under its model name at once;
* the parts of a stacked tensor are held until the last one has been read (their count is known from
  every shard's key list before anything is read), then assembled by transformers' own converter and
  placed — one stacked tensor in memory at a time, not the checkpoint.

With a transformers that has no conversion mapping, every key keeps its name (older checkpoints and
models agree there).
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict

import torch
from torch import nn


def _natural(key: str) -> list:
    # experts.10 after experts.9: the stacked order is the experts' numeric order
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


class CheckpointKeys:
    """One model's key rules; ``plan(all checkpoint keys)`` first, then ``take`` each tensor as read."""

    def __init__(self, model: nn.Module) -> None:
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        except ImportError:  # transformers < 5: names are the checkpoint's
            self._rules = None
            return
        mapping = get_model_conversion_mapping(model) if hasattr(model, "config") else []
        self._renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        self._converters = [m for m in mapping if isinstance(m, WeightConverter)]
        self._rules = rename_source_key
        self._by_pattern = {p: c for c in self._converters for p in c.source_patterns}
        self._model_names = set(model.state_dict().keys()) | {n for n, _ in model.named_parameters(remove_duplicate=False)}
        self._expected: dict[str, list[str]] = {}
        self._held: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)

    def name(self, key: str) -> tuple[str, str | None]:
        """(model name, converter pattern or None) of checkpoint ``key``."""
        if self._rules is None:
            return key, None
        renamed, pattern = self._rules(key, self._renamings, self._converters)
        if renamed not in self._model_names and key in self._model_names:
            return key, None  # the model kept the checkpoint's name: no rule applies
        return renamed, pattern

    def plan(self, keys) -> None:
        """Record, for every stacked target, which checkpoint keys make it."""
        for key in keys:
            target, pattern = self.name(key)
            if pattern is not None:
                self._expected.setdefault(target, []).append(key)

    def take(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The (model name, tensor) pairs ready to place after reading ``key``: the key itself renamed, or
        — for a part of a stacked tensor — nothing until its last part, then the assembled tensor."""
        target, pattern = self.name(key)
        if pattern is None:
            return [(target, tensor)]
        held = self._held[target]
        held[key] = tensor.clone()  # a copy: the shard's mapped view would keep its pages resident
        if len(held) < len(self._expected.get(target, ())):
            return []
        del self._held[target]
        converter = copy.deepcopy(self._by_pattern[pattern])
        for part in sorted(held, key=_natural):
            _, part_pattern = self.name(part)
            converter.add_tensor(target, part, part_pattern, held[part])  # a tensor: used as it is
        out = converter.convert(target)
        return [(name, t) for name, t in out.items()]
