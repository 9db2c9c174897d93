"""Get a quantized model ready for LoRA training (QLoRA §4 "Experimental setup", PEFT's
``prepare_model_for_kbit_training`` minus its blanket fp32 upcast).

* every parameter is frozen (``lorakit.inject`` then unfreezes the adapters);
* normalization layers' weights go to fp32 (their scales are small and sensitive to bf16
  rounding); a forward hook casts each norm's output back to its input dtype, so activations stay in
  the model's dtype and a 16-bit head still gets 16-bit input;
* the output head (and with it a tied input embedding) is upcast only when asked: on a 7B model it
  is 131M parameters, 0.5 GB in fp32 — more than all 4-bit attention weights of a few layers;
* gradient checkpointing (non-reentrant) with input gradients enabled
  (``enable_input_require_grads``), so that activations are recomputed instead of stored and
  checkpointed segments get gradients even though the embedding is frozen. Its recomputation runs
  under ``autograd4.recompute_context``: the CPU 4-bit matmuls keep the W they rebuild there for the
  block's backward (bounded by ``autograd4.KEEP_BYTES``), two rebuilds a step instead of three.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, QuantizationError
from ..validate import check_bool
from .autograd4 import recompute_context
from .model import output_head


def is_norm(module: nn.Module) -> bool:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, getattr(nn, "RMSNorm", nn.LayerNorm))
    return isinstance(module, norm_types) or type(module).__name__.lower().endswith("norm")


def _upcast(module: nn.Module) -> None:
    for p in module.parameters(recurse=False):
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def _output_in_input_dtype(module, args, kwargs, output):
    # An fp32 norm weight would promote its output (and the whole residual stream after it) to fp32,
    # and a bf16 head after the final norm would then get fp32 input. Norms compute in fp32 inside;
    # their output goes back to the dtype that came in.
    x = args[0] if args else next(iter(kwargs.values()), None)
    if isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and output.dtype != x.dtype:
        return output.to(x.dtype)
    return output


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = True, upcast_norms: bool = True,
                              upcast_head: bool = False) -> nn.Module:
    """Freeze ``model``, upcast its norms (and optionally its head) to fp32, enable gradient
    checkpointing; in place, returns the model."""
    if not isinstance(model, nn.Module):
        raise QuantizationError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    for name, flag in (("gradient_checkpointing", gradient_checkpointing), ("upcast_norms", upcast_norms),
                       ("upcast_head", upcast_head)):
        check_bool(name, flag, QuantizationError)  # "no" would read as True
    for p in model.parameters():
        p.requires_grad_(False)
    if upcast_norms:
        for module in model.modules():
            if is_norm(module):
                _upcast(module)
                if not getattr(module, "_lorakit_cast_back", False):
                    module.register_forward_hook(_output_in_input_dtype, with_kwargs=True)
                    module._lorakit_cast_back = True
    if upcast_head:
        head = output_head(model)
        if head is None:
            raise ConfigError("upcast_head=True but the model has no output head (get_output_embeddings() is None).")
        _upcast(head)
    if gradient_checkpointing:
        _enable_checkpointing(model)
        if callable(getattr(model, "enable_input_require_grads", None)):
            model.enable_input_require_grads()
        if getattr(getattr(model, "config", None), "use_cache", None):
            model.config.use_cache = False  # a KV cache is useless (and warned about) under checkpointing
    return model


def _enable_checkpointing(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False, "context_fn": recompute_context}
    if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers ≥ 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif callable(getattr(model, "gradient_checkpointing_enable", None)):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ConfigError(
            f"{type(model).__name__} has no activation/gradient_checkpointing_enable (not a transformers model); "
            "pass gradient_checkpointing=False and checkpoint it yourself (torch.utils.checkpoint)."
        )
