"""``QuantLinear``'s LoRA base kind (see ``lorakit.layers.kinds``). ``QuantLinear`` names it in its
class attribute ``lora_base_kind``, so the core finds it without any registration.

The LoRA branch is the linear one (A (r, in), B (out, r)); what differs is merging: a 4-bit or int8
weight cannot take ``W += ΔW`` in place without re-quantizing it, so the kind refuses and points to
``lorakit.quant.merge``, which dequantizes, merges and returns plain ``nn.Linear`` layers.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterStateError
from ..layers.kinds import LinearKind


class QuantLinearKind(LinearKind):
    name = "quant_linear"
    in_place = False

    def matches(self, module: nn.Module) -> bool:
        return getattr(type(module), "lora_base_kind", None) is self

    def dims(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def weight_2d(self, module: nn.Module) -> torch.Tensor:
        return module.dequantize_weight()  # (out, in)

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The dequantized weight (a new tensor, not a view: the module stores no dense weight)."""
        return module.dequantize_weight()

    def add_to_weight(self, module: nn.Module, delta: torch.Tensor) -> None:
        raise AdapterStateError(
            f"cannot merge a LoRA update into a {module.quant_type} QuantLinear "
            f"({module.out_features}x{module.in_features}) in place. Use "
            "lorakit.quant.merge.dequantize_and_merge(model) for a 16/32-bit merged model, or "
            "lorakit.quant.merge.requantized_merge(model) to quantize the merged weights again."
        )

