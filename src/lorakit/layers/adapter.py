"""One LoRA adapter on one layer: the factors A and B, the scaling and the dropout probability.

This module holds the *one* delta formula of lorakit (Hu et al. 2021, §4.1):

    ΔW = scaling · B · A          (as a (fan_out, fan_in) matrix; kernels flattened into fan_in)

Merges, exports, combinations and tests all go through :meth:`LoraAdapter.delta_2d`; the forward
pass never builds ΔW (it runs x → A → B through the base kind's branch).
"""

from __future__ import annotations

import torch
from torch import nn

from .kinds import Geometry, init_factors


class LoraAdapter(nn.Module):
    """Factors ``lora_A`` (r, fan_in…) and ``lora_B`` (fan_out, r…) with a fixed scaling."""

    def __init__(self, geometry: Geometry, r: int, alpha: float, scaling: float, dropout: float,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(geometry.a_shape, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(geometry.b_shape, dtype=dtype, device=device))
        self.r = r
        self.alpha = alpha
        self.scaling = scaling
        self.dropout = dropout

    def reset(self, zero_b: bool, mode: bool | str) -> None:
        init_factors(self.lora_A, self.lora_B, zero_b, mode)

    def delta_2d(self) -> torch.Tensor:
        """ΔW = scaling · B·A as a (fan_out, fan_in) matrix, in the factors' dtype."""
        return (self.lora_B.flatten(1) @ self.lora_A.flatten(1)) * self.scaling

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scaling) as the base kind's branch consumes them. This and :meth:`delta_2d` are the
        adapter contract: variants (AdaLoRA's P·Λ·Q, O-LoRA's past + new factors) provide the same."""
        return self.lora_A, self.lora_B, self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}"
