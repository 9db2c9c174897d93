"""Per-row ``modules_to_save``: row i of the batch runs adapter ``names[i]``'s trainable copy (the
original module for None or for an adapter without a copy here), as PEFT's ``adapter_names=``.

The first positional argument carries the batch on dim 0 (hidden states (B, T, H) for a head,
ids (B, T) for an embedding); each group of rows runs its module once and the outputs are put
back in row order.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterStateError


def per_row_forward(host: nn.Module, names: list[str | None], x, *args, **kwargs) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != len(names):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise AdapterStateError(
            f"per-row adapter names: got {len(names)} names, but the input of a modules_to_save module is {got}; "
            "give exactly one name (or None) per row of the batch."
        )
    groups: dict[str | None, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n if n in host.modules_to_save else None, []).append(i)
    out = None
    for name, rows in groups.items():
        module = host.original_module if name is None else host.modules_to_save[name]
        idx = torch.tensor(rows, device=x.device)
        sub = module(x.index_select(0, idx), *args, **kwargs)
        if not isinstance(sub, torch.Tensor):
            raise AdapterStateError(
                f"per-row adapters: {type(module).__name__} returns {type(sub).__name__}, not a tensor; "
                "per-row selection of its trainable copies is not supported."
            )
        if out is None:
            out = sub.new_empty((len(names), *sub.shape[1:]))
        out.index_copy_(0, idx, sub)
    return out
