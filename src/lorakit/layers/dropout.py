"""Dropout on the LoRA branch input, one mask per input tensor.

LoRA applies dropout to the input of A only (the base path sees the clean x). Projections that read
the same tensor (q/k/v of an attention block; gate/up of a SwiGLU MLP) share one dropped copy here,
so an attention block draws one mask instead of three, stores one dropped activation instead of
three, and autograd runs one dropout backward. Each projection still has its own A and B, so the
regularisation per adapter is the same as with independent masks; only the masks are correlated
across the projections of one input. (PEFT draws an independent mask per projection.)

The cache is keyed by the identity of the input tensor and the probability, and an entry dies with
its input (weak reference), so nothing outlives a step. Under gradient checkpointing the recompute
draws the same mask because the RNG state is restored and the first projection draws it again.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

_CACHE: dict[tuple[int, float], tuple[weakref.ref, torch.Tensor]] = {}


def shared_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``F.dropout(x, p, training=True)``, computed once per (tensor, p)."""
    key = (id(x), p)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is x:
        return hit[1]
    dropped = F.dropout(x, p, training=True)
    _CACHE[key] = (weakref.ref(x, lambda _ref, k=key: _CACHE.pop(k, None)), dropped)
    return dropped


def cache_size() -> int:
    return len(_CACHE)
