"""Shared by the kinds whose update is a dense ΔW rebuilt from small factors (LoHa, LoKr).

Their forward builds ΔW (out × in·k·k) each call, as LyCORIS and PEFT do — they have no rank-r path
through x — and runs the base's own op with it: y = base(x) + op(x ⊙ mask, ΔW) (``BaseKind.apply_weight``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.dropout import apply_mask
from ..layers.kinds import BaseKind


def base_shape(base: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) of a Linear / Conv2d base (kernel () for a Linear)."""
    if isinstance(base, nn.Conv2d):
        return base.out_channels, base.in_channels, tuple(base.kernel_size)
    return base.out_features, base.in_features, ()


def refuses(base: nn.Module, kind_name: str) -> str | None:
    """Why a LoHa/LoKr adapter cannot wrap ``base`` (None: it can)."""
    if type(base) is nn.Linear:
        return None
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            return f"grouped convolutions (groups={base.groups}) are not supported; remove it from the targets"
        return None
    return f"{kind_name} adapts nn.Linear and nn.Conv2d only; remove it from the targets"


def apply_dense(kind: BaseKind, base: nn.Module, base_out: torch.Tensor, x: torch.Tensor, delta_2d: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
    """``base_out + op(x ⊙ mask, ΔW)`` in the base output's dtype."""
    x = apply_mask(x, mask)
    return base_out + kind.apply_weight(base, x, delta_2d.to(base_out.dtype)).to(base_out.dtype)
