"""Dropout on the LoRA branch input: one pre-scaled mask per input tensor.

LoRA applies dropout to the input of A only (the base path sees the clean x). Here dropout is a
mask m ∈ {0, 1/(1−p)} of x's shape that the branch multiplies in (``branch.py`` fuses it: it never
stores a dropped copy of x; backward recomputes x·m where it needs it). Projections that read the
same tensor (q/k/v of an attention block; gate/up of a SwiGLU MLP) share one mask, so an attention
block draws one mask instead of three and keeps one mask alive instead of three dropped copies.
Each projection still has its own A and B, so each adapter sees standard input dropout; only the
masks are correlated across the projections of one input. (PEFT draws an independent mask per
projection and stores a dropped copy of x for each.)

The mask is drawn from uniform 64-bit random words cut into four signed 16-bit lanes (one RNG draw
per four elements instead of one per element, ~3× faster than ``F.dropout`` on CPU); an element is
dropped when its lane is < −2¹⁵ + round(p·2¹⁶), so the probability actually used is
p̃ = round(p·2¹⁶)/2¹⁶ (within 7.7e-6 of p), and kept elements are scaled by the exact 1/(1 − p̃), keeping the branch unbiased. The draws
come from torch's default generator, so ``torch.manual_seed`` and checkpointed RNG states reproduce
them.

The cache is keyed by the identity of the input tensor and p, and an entry dies with its input
(weak reference), so nothing outlives a step. Under gradient checkpointing the recompute draws the
same mask because the RNG state is restored and the first projection draws it again.
"""

from __future__ import annotations

import weakref

import torch

_CACHE: dict[tuple[int, float], tuple[weakref.ref, torch.Tensor]] = {}
_LANES = 1 << 16  # values a 16-bit lane takes


def shared_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout mask (values 0 or 1/(1−p̃), x's dtype and shape) for input ``x``, drawn once."""
    key = (id(x), p)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is x:
        return hit[1]
    keep, scale = keep_mask(x.shape, p, x.device)
    mask = keep.to(x.dtype).mul_(scale)
    _CACHE[key] = (weakref.ref(x, lambda _ref, k=key: _CACHE.pop(k, None)), mask)
    return mask


def keep_mask(shape: torch.Size, p: float, device) -> tuple[torch.Tensor, float]:
    """A bool mask of ``shape`` keeping each element with probability 1 − p̃, and 1/(1 − p̃)."""
    n = shape.numel()
    dropped = round(p * _LANES)  # how many of the 2¹⁶ lane values mean "drop"
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    lanes = words.view(torch.int16)[:n].view(shape)  # four uniform signed 16-bit lanes per word
    keep = lanes >= dropped - _LANES // 2
    return keep, 1.0 / (1.0 - dropped / _LANES)


def cache_size() -> int:
    return len(_CACHE)
