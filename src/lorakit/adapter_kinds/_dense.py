"""Shared by the kinds whose update is a dense ΔW rebuilt from small factors (LoHa, LoKr).

``base_shape(base)`` gives (fan_out, fan_in, kernel); ``apply_dense(base, base_out, x, ΔW)`` runs the
base's own op with weight ΔW and no bias and adds it: y = base(x) + op(x, ΔW). The forward therefore
builds ΔW (out × in·k·k) each call, as LyCORIS does — LoHa/LoKr have no rank-r path through x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError


def base_shape(base: nn.Module, kind_name: str) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) of a Linear / Conv2d base (kernel () for a Linear)."""
    if isinstance(base, nn.Linear):
        return base.out_features, base.in_features, ()
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise UnsupportedModuleError(f"{kind_name} on a grouped Conv2d (groups={base.groups}) is not supported; "
                                         "remove the module from the targets.")
        return base.out_channels, base.in_channels, tuple(base.kernel_size)
    raise UnsupportedModuleError(f"{kind_name} adapts nn.Linear and nn.Conv2d, not {type(base).__name__}; "
                                 "remove the module from the targets.")


def apply_dense(base: nn.Module, base_out: torch.Tensor, x: torch.Tensor, delta_2d: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """``base_out + op(x ⊙ mask, ΔW)`` with the base's op (linear, or conv with its stride/padding)."""
    dt = base_out.dtype
    if mask is not None:
        x = x * mask
    if isinstance(base, nn.Conv2d):
        w = delta_2d.reshape(base.weight.shape).to(dt)
        return base_out + F.conv2d(x.to(dt), w, None, base.stride, base.padding, base.dilation)
    return base_out + F.linear(x.to(dt), delta_2d.to(dt))
