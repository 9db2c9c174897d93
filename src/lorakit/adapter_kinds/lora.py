"""LoRA (Hu et al. 2021, arXiv 2106.09685): the adapter module and its kind — the reference kind of
the adapter protocol (``lorakit.layers.protocol``).

This file holds the *one* delta formula of plain LoRA (§4.1):

    ΔW = scaling · B · A          (as a (fan_out, fan_in) matrix; kernels flattened into fan_in)

On a grouped convolution B is a grouped 1×…×1 conv (out, r/G, 1…), i.e. the block-diagonal matrix
``block_diagonal(B, G)`` (out, r), and ΔW is the dense (out, in·k) conv the branch applies
(``layers/kinds.py``, GroupedConvKind).

Merges, exports, combinations and tests all go through :meth:`LoraAdapter.delta_2d`; the forward
pass never builds ΔW (it runs x → A → B through the base kind's fused branch, the protocol's
default ``forward_into``). File tensors: ``lora_A.weight`` / ``lora_B.weight``, or ``lora_embedding_A`` /
``lora_embedding_B`` on an embedding (PEFT's names).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import LoraConfig
from ..layers.kinds import BaseKind, Geometry, block_diagonal, init_factors
from ..layers.protocol import Adapter, AdapterKind, base_device
from .weight_inits import init_from_weight


class LoraAdapter(Adapter):
    """Factors ``lora_A`` (r, fan_in…) and ``lora_B`` (fan_out, r…) — (fan_out, r/G, 1…) on a grouped
    conv (``b_groups`` = G) — with a fixed scaling."""

    def __init__(self, geometry: Geometry, r: int, alpha: float, scaling: float, dropout: float,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(geometry.a_shape, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(geometry.b_shape, dtype=dtype, device=device))
        self.r = r
        self.alpha = alpha
        self.scaling = scaling
        self.dropout = dropout
        self.b_groups = geometry.b_groups

    def reset(self, zero_b: bool, mode: bool | str) -> None:
        init_factors(self.lora_A, self.lora_B, zero_b, mode)

    def delta_2d(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW = scaling · B·A as a (fan_out, fan_in) matrix, in the factors' dtype (B block-diagonal on a
        grouped conv: (fan_out, r/G) -> (fan_out, r))."""
        return (block_diagonal(self.lora_B.flatten(1), self.b_groups) @ self.lora_A.flatten(1)) * self.scaling

    def attach(self, kind: BaseKind, base: nn.Module) -> None:
        """Leave PiSSA/OLoRA's residual in the base: W ← W − s·B0A0 (``weight_inits.py``)."""
        pending = self.__dict__.pop("pending_base_delta", None)
        if pending is not None:
            kind.add_to_weight(base, kind.to_layout(base, pending))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scaling) as the base kind's fused branch consumes them."""
        return self.lora_A, self.lora_B, self.scaling

    def peft_tensors(self, kind: BaseKind) -> dict[str, torch.Tensor]:
        if kind.embedding:
            return {"lora_embedding_A": self.lora_A, "lora_embedding_B": self.lora_B}
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}"


def new_lora_adapter(base_kind: BaseKind, base: nn.Module, r: int, alpha: float, scaling: float,
                     dropout: float, init: bool | str = True) -> LoraAdapter:
    """A LoRA adapter sized for ``base``: factors in fp32 on the base's device (even on a bf16/fp16
    base: stable Adam updates; the branch casts them to the compute dtype, rank-sized copies only)."""
    adapter = LoraAdapter(base_kind.geometry(base, r), r, alpha, scaling,
                          0.0 if base_kind.embedding else dropout, device=base_device(base))
    adapter.reset(base_kind.zero_b, init)
    return adapter


class LoraKind(AdapterKind):
    """Plain LoRA: a ``LoraConfig`` without variant flags; files with ``peft_type: "LORA"``."""

    name = "lora"
    peft_type = "LORA"
    config_type = LoraConfig

    def create(self, base_kind, base, path, config: LoraConfig) -> LoraAdapter:
        init = config.init_lora_weights
        adapter = new_lora_adapter(base_kind, base, config.rank_for(path), config.alpha_for(path),
                                   config.scaling_for(path), float(config.lora_dropout),
                                   True if isinstance(init, str) and init != "gaussian" else init)
        init_from_weight(adapter, base_kind, base, path, init)
        return adapter


LORA = LoraKind()
