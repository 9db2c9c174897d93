"""Embeddings whose forward scales the looked-up rows (Gemma: ``lookup · √d`` in
``GemmaTextScaledWordEmbedding``; BART/M2M100 with ``scale_embedding``).

The base output is ``s · W[ids]``, so the LoRA branch must be ``s · scaling · (BA)ᵀ[ids]`` too — else
the unmerged path differs from the merged one (merging adds ΔW into W, which the forward scales).
Such a layer exposes ``s`` as ``embed_scale`` (a number or a one-element tensor; PEFT reads the same
attribute). An embedding subclass that transforms rows in its forward without saying how is probed
once when an adapter is added: identity is fine, anything else is refused by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError


def embed_scale(module: nn.Module) -> torch.Tensor | float | None:
    """The factor the module's forward applies to looked-up rows (None: none)."""
    s = getattr(module, "embed_scale", None)
    if s is None:
        return None
    if isinstance(s, torch.Tensor) and s.numel() != 1:
        raise UnsupportedModuleError(
            f"{type(module).__name__}.embed_scale has shape {tuple(s.shape)}; LoRA supports a scalar embedding "
            "scale only. Remove this embedding from target_modules."
        )
    return s


def check_scaled_forward(module: nn.Embedding) -> None:
    """Refuse an embedding subclass whose forward is not ``embed_scale · lookup`` (checked on a few ids)."""
    if type(module).forward is nn.Embedding.forward or module.weight.device.type == "meta":
        return
    ids = torch.arange(min(4, module.num_embeddings), device=module.weight.device)
    with torch.no_grad():
        got = module(ids)
        want = F.embedding(ids, module.weight, module.padding_idx)
        s = embed_scale(module)
        if s is not None:
            want = want * (s.to(want.dtype) if isinstance(s, torch.Tensor) else s)
    if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-6):
        raise UnsupportedModuleError(
            f"{type(module).__name__} changes the looked-up rows in its forward in a way lorakit cannot repeat "
            "on the LoRA branch (only a scalar `embed_scale` attribute is understood). Remove it from "
            "target_modules, or expose its scale as `embed_scale`."
        )
