"""How each adapter kind appears in single-file diffusion LoRAs (kohya / LyCORIS keys).

A static table, one entry per kind: the tensor suffixes a module carries in the file, how to read
rank and α from them, and which adapter tensor each suffix fills. The keys are kohya-ss/sd-scripts'
(``lora_down.weight`` = A (r, in[, k, k]), ``lora_up.weight`` = B (out, r[, 1, 1]), scalar ``alpha``)
and LyCORIS' (``hada_w1_a`` ..., ``lokr_w1`` / ``lokr_w1_a`` ...). Consumers apply
ΔW = (α / r) · up · down with r = lora_down.shape[0] (ComfyUI, A1111, diffusers).
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapter_kinds.lora import LoraAdapter


def effective_scaling(adapter: nn.Module) -> float:
    """The adapter's scaling without a user strength applied by ``set_weights``."""
    return float(getattr(adapter, "base_scaling", adapter.scaling))


class LoraFileKind:
    name = "lora"
    adapter_type = LoraAdapter
    required = frozenset({"lora_down.weight", "lora_up.weight"})
    optional = frozenset({"alpha"})

    def matches(self, keys: set[str]) -> bool:
        return self.required <= keys <= self.required | self.optional

    def rank(self, group: dict[str, torch.Tensor]) -> int:
        return int(group["lora_down.weight"].shape[0])

    def params(self, adapter: nn.Module) -> dict[str, torch.Tensor]:
        """suffix → the adapter parameter it fills (the file's tensors without alpha)."""
        return {"lora_down.weight": adapter.lora_A, "lora_up.weight": adapter.lora_B}

    def peft_params(self, adapter: nn.Module) -> dict[str, torch.Tensor]:
        """suffix → parameter in PEFT / diffusers files (``<component>.<path>.<suffix>``)."""
        return {"lora_A.weight": adapter.lora_A, "lora_B.weight": adapter.lora_B}

    def peft_rank(self, group: dict[str, torch.Tensor]) -> int:
        return int(group["lora_A.weight"].shape[0])

    def alpha(self, adapter: nn.Module) -> float:
        # The true per-module α with ΔW = α/r·B·A (also right for rsLoRA: α_file = s·r).
        return effective_scaling(adapter) * adapter.lora_A.shape[0]


LORA = LoraFileKind()
FILE_KINDS = {LORA.name: LORA}


def kind_for_adapter(adapter: nn.Module):
    for kind in FILE_KINDS.values():
        if type(adapter) is kind.adapter_type:
            return kind
    return None


def classify(group: dict[str, torch.Tensor]):
    """The file kind whose key family a module's tensors form exactly, or None."""
    keys = set(group)
    for kind in FILE_KINDS.values():
        if kind.matches(keys):
            return kind
    return None
