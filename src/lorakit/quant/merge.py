"""Merging LoRA adapters into a quantized base (QLoRA's deployment step).

A 4-bit weight cannot absorb ΔW in place, so there are two ways out:

* :func:`dequantize_and_merge` — W' = dequantize(W) + ΔW in 16/32 bit, as plain ``nn.Linear``
  layers: exactly the function the trained model computes, saved as a normal transformers checkpoint;
* :func:`requantized_merge` — W' quantized again (4-bit size), which adds a new rounding error;
  the returned report measures it on random inputs against the dequantized merge.

ΔW comes from the core (``LoraLayer.delta``, the one delta formula); only active adapters merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import merge_and_unload
from ..errors import QuantizationError
from ..layers.host import LoraLayer
from ..state import clear_state, lora_layers, set_submodule
from .linear import QuantLinear, quantize_weight


def _merged_weight(host_or_q: nn.Module) -> torch.Tensor:
    """W_deq + Σ ΔW of the active adapters, (out, in) fp32."""
    if isinstance(host_or_q, QuantLinear):
        return host_or_q.qweight.dequantize(torch.float32)
    w = host_or_q.base_layer.qweight.dequantize(torch.float32)
    for name in host_or_q.active:
        if name not in host_or_q.merged:
            w += host_or_q.delta(name).to(w.device)
    return w


def _dense(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _quant_hosts(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(p, h) for p, h in lora_layers(model) if isinstance(h.base_layer, QuantLinear)]


def _finish(model: nn.Module) -> nn.Module:
    """Merge LoRA hosts over float bases with the core, then drop lorakit's bookkeeping."""
    if any(True for _ in lora_layers(model)):
        return merge_and_unload(model)
    clear_state(model)
    for p in model.parameters():
        p.requires_grad_(True)  # as merge_and_unload leaves a plain model
    return model


def dequantize_and_merge(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every LoRA-wrapped ``QuantLinear`` by an ``nn.Linear`` holding W_deq + ΔW and every other
    ``QuantLinear`` by its dequantized ``nn.Linear`` (in place; returns the model).

    ``dtype``: of the new layers; default each weight's original dtype (e.g. bf16). The result has
    no lorakit modules left and saves with ``save_pretrained`` as a normal checkpoint.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise QuantizationError(f"dtype={dtype!r}: give a floating torch dtype (torch.bfloat16, torch.float16, "
                                "torch.float32) or None for each weight's original dtype.")
    for path, host in _quant_hosts(model):
        q = host.base_layer
        set_submodule(model, path, _dense(_merged_weight(host), q.bias, dtype or q.layout.dtype))
    for path, q in [(p, m) for p, m in model.named_modules() if isinstance(m, QuantLinear)]:
        set_submodule(model, path, _dense(_merged_weight(q), q.bias, dtype or q.layout.dtype))
    return _finish(model)


@dataclass
class RequantReport:
    """Relative output error ‖x W_qᵀ − x W'ᵀ‖ / ‖x W'ᵀ‖ per merged layer, x ~ N(0, 1)."""

    per_layer: dict[str, float] = field(default_factory=dict)

    @property
    def max(self) -> float:
        return max(self.per_layer.values(), default=0.0)

    @property
    def mean(self) -> float:
        return sum(self.per_layer.values()) / len(self.per_layer) if self.per_layer else 0.0

    def __str__(self) -> str:
        return f"requantized merge of {len(self.per_layer)} layers: relative output error mean {self.mean:.4g}, max {self.max:.4g}"


@torch.no_grad()
def requantized_merge(model: nn.Module, quant_type: str | None = None, double_quant: bool | None = None,
                      blocksize: int | None = None, n_inputs: int = 64, seed: int = 0
                      ) -> tuple[nn.Module, RequantReport]:
    """Merge each LoRA-wrapped ``QuantLinear`` into a new ``QuantLinear`` of W_deq + ΔW, quantized
    again (by default in the base's own format), and report the output error that adds.

    The reference for the error is the dequantized merge (what :func:`dequantize_and_merge` gives,
    in fp32): rows of x ~ N(0, 1) from a generator seeded with ``seed``.
    """
    report = RequantReport()
    gen = torch.Generator().manual_seed(seed)
    for path, host in _quant_hosts(model):
        q = host.base_layer
        lay = q.layout
        merged = _merged_weight(host)  # (out, in) fp32
        fmt = quant_type or lay.quant_type
        new_q = QuantLinear(
            quantize_weight(merged.to(lay.dtype), fmt,
                            lay.double_quant if double_quant is None else double_quant,
                            getattr(lay, "blocksize", 64) if blocksize is None else blocksize),
            q.bias, q.compute_dtype)
        x = torch.randn(n_inputs, q.in_features, generator=gen).to(merged.device)
        ref = x @ merged.T
        got = x @ new_q.qweight.dequantize(torch.float32).T
        report.per_layer[path] = float((got - ref).norm() / ref.norm().clamp(min=1e-30))
        set_submodule(model, path, new_q)
    return _finish(model), report
