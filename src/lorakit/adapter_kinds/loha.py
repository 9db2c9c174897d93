"""LoHa: low-rank Hadamard product (Hyeon-Woo et al., "FedPara", ICLR 2022, §3.1; LyCORIS' ``loha``).

    ΔW = (α / r) · (W1a · W1b) ⊙ (W2a · W2b)       W1a, W2a: (out, r)   W1b, W2b: (r, in·k·k)

The Hadamard product of two rank-r matrices has rank up to r², for 4·r·(out + in) parameters'
worth of two LoRAs. Convolutions are flattened (out, in·k·k) — LyCORIS' and PEFT's layout without
Tucker/"effective conv" (``hada_t1``/``hada_t2`` are not implemented). File tensors have the same
names in PEFT and LyCORIS: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (+ a scalar
``alpha`` in LyCORIS files).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layers.kinds import BaseKind
from ..layers.protocol import Adapter, AdapterKind, base_device
from ._dense import apply_dense, base_shape, refuses
from .lycoris_config import LoHaConfig


class LoHaAdapter(Adapter):
    """The four LoHa factors of one layer; ``delta_2d`` is the one LoHa formula."""

    def __init__(self, base: nn.Module, r: int, alpha: float, scaling: float | None = None):
        super().__init__()
        out, fan_in, k = base_shape(base)
        fan_in *= math.prod(k)
        self.hada_w1_a = nn.Parameter(torch.empty(out, r))
        self.hada_w1_b = nn.Parameter(torch.empty(r, fan_in))
        self.hada_w2_a = nn.Parameter(torch.empty(out, r))
        self.hada_w2_b = nn.Parameter(torch.empty(r, fan_in))
        self.r, self.alpha = r, float(alpha)
        self.scaling = float(alpha) / r if scaling is None else float(scaling)
        self.dropout = 0.0

    def reset(self, zero: bool = True) -> None:
        """PEFT's / LyCORIS' start: W2b = 0, so ΔW = 0; ``zero=False`` makes every factor random (tests)."""
        with torch.no_grad():
            for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            if zero:
                nn.init.zeros_(self.hada_w2_b)

    def delta_2d(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW = s · (W1a·W1b) ⊙ (W2a·W2b) as an (out, in·k·k) matrix."""
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling

    def forward_into(self, kind: BaseKind, base: nn.Module, base_out: torch.Tensor, x: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
        return apply_dense(kind, base, base_out, x, self.delta_2d(), mask)

    def peft_tensors(self, kind: BaseKind | None = None) -> dict[str, torch.Tensor]:
        return {"hada_w1_a": self.hada_w1_a, "hada_w1_b": self.hada_w1_b,
                "hada_w2_a": self.hada_w2_a, "hada_w2_b": self.hada_w2_b}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


class LoHaKind(AdapterKind):
    """LoHa on the adapter protocol: ``LoHaConfig``; files with ``peft_type: "LOHA"``."""

    name = "loha"
    peft_type = "LOHA"
    config_type = LoHaConfig

    def refuses(self, base_kind, base):
        return refuses(base, "LoHa")

    def create(self, base_kind, base, path, config: LoHaConfig) -> LoHaAdapter:
        adapter = LoHaAdapter(base, config.rank_for(path), config.alpha_for(path))
        adapter.reset(zero=bool(config.init_weights))
        return adapter.to(base_device(base))


LOHA = LoHaKind()
