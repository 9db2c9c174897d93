"""Dropout on the adapter branch input, without hidden global state.

LoRA applies dropout to the input of A only (the base path sees the clean x). Here dropout is a
mask m ∈ {0, 1/(1−p)} of x's shape that the branch multiplies in (``branch.py`` fuses it: it never
stores a dropped copy of x; backward recomputes x·m where it needs it).

Default — PEFT's semantics: every projection draws its own independent mask
(:func:`dropout_mask`), each call, from torch's default generator. Under gradient checkpointing the
recompute restores the RNG state and replays the same draws in the same order, so it sees the same
masks.

Option — shared masks (:class:`SharedMasks`, owned by the model's layers, switched on with
:func:`lorakit.layers.host.share_dropout_masks`): projections that read the same input tensor (q/k/v; gate/up) reuse one
mask, so a block draws and keeps one mask instead of three. Each projection still has its own A and B;
only the masks are correlated across the projections of one input. The cache lives on the layers of
one model (not in a module-level dict), is keyed by the identity of the input tensor, and an entry
dies with its input (weak reference). Measured (``bench/bench_lora.py --compare-dropout --quick
--rounds 7 --steps 5 --threads 1``, a noisy shared 2-core box): step time median 0.650 s shared vs
0.659 s per-projection (spread 0.54–0.77 vs 0.56–0.87: no measurable difference); peak RSS 491 vs
497 MiB (lower in all 7 rounds, −1.1 %). Hence per-projection is the default.

The mask is drawn from uniform 64-bit random words cut into four signed 16-bit lanes (one RNG draw
per four elements instead of one per element, ~3× faster than ``F.dropout`` on CPU; on CPU the words
come from an SFC64 stream seeded by one draw of torch's generator, :func:`random_words`); an element is
dropped when its lane is < −2¹⁵ + round(p·2¹⁶), so the probability actually used is
p̃ = round(p·2¹⁶)/2¹⁶ (within 7.7e-6 of p), and kept elements are scaled by the exact 1/(1 − p̃),
keeping the branch unbiased.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from .seeded_dropout import SeededMask, draw, lane_rule


def draw_mask(x: torch.Tensor, p: float) -> torch.Tensor | SeededMask:
    """The mask the adapter host draws for input ``x``: a :class:`SeededMask` on CPU where the C
    kernel runs (``seeded_dropout.py``: nothing stored, one pass per use), else a dense mask."""
    seeded = draw(x, p)
    return seeded if seeded is not None else dropout_mask(x, p)


def apply_mask(x: torch.Tensor, mask: torch.Tensor | SeededMask | None) -> torch.Tensor:
    """``x ⊙ mask`` (mask: None, a dense mask broadcastable to x, or a SeededMask of x's shape)."""
    if mask is None:
        return x
    if isinstance(mask, SeededMask):
        return x * mask  # SeededMask.__rmul__: its dense form
    return x * mask.reshape(x.shape).to(x.dtype) if mask.numel() == x.numel() else x * mask


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A fresh dropout mask (values 0 or 1/(1−p̃), x's dtype and shape) for input ``x``."""
    keep, scale = keep_mask(x.shape, p, x.device)
    # bool → float has no vectorised kernel in torch's CPU casts (0.9 ms for 1024 × 512); the same
    # bytes read as uint8 convert 4× faster.
    mask = keep.view(torch.uint8).to(x.dtype).mul_(scale)
    # The bool mask rides along: a branch that keeps the mask for backward keeps it (as bits on CPU,
    # branch.py) instead of the 4-byte elements (~600 MB less on SmolLM2's shape).
    mask.lorakit_keep, mask.lorakit_scale = keep, scale
    return mask


class SharedMasks:
    """One mask per input tensor, shared by the layers that hold this object (see module docstring)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, float], tuple[weakref.ref, torch.Tensor | SeededMask]] = {}

    def mask(self, x: torch.Tensor, p: float) -> torch.Tensor | SeededMask:
        key = (id(x), p)
        hit = self._cache.get(key)
        if hit is not None and hit[0]() is x:
            return hit[1]
        mask = draw_mask(x, p)
        cache = self._cache
        cache[key] = (weakref.ref(x, lambda _ref, k=key: cache.pop(k, None)), mask)
        return mask

    def __len__(self) -> int:
        return len(self._cache)


def keep_mask(shape: torch.Size, p: float, device) -> tuple[torch.Tensor, float]:
    """A bool mask of ``shape`` keeping each element with probability 1 − p̃, and 1/(1 − p̃)."""
    n = shape.numel()
    threshold, scale = lane_rule(p)  # a signed lane below the threshold drops its element
    words = random_words((n + 3) // 4, torch.device(device) if device is not None else torch.device("cpu"))
    if words.device.type == "cpu" and not torch.compiler.is_compiling():
        # numpy's int16 compare is vectorised (0.08 ms for 1024 × 512, torch's 0.5 ms); same bits.
        lanes = words.numpy().view(np.int16)[:n]  # four uniform signed 16-bit lanes per word
        return torch.from_numpy(lanes >= threshold).view(shape), scale
    lanes = words.view(torch.int16)[:n].view(shape)
    return lanes >= threshold, scale


def random_words(count: int, device: torch.device) -> torch.Tensor:
    """``count`` uniform 64-bit words (int64) on ``device``, driven by torch's generator.

    On CPU, torch's Mersenne twister fills a ranged int64 tensor at ~25 ns a word (3.4 ms for one
    576-wide 4 × 256 batch, more than the rank-16 GEMMs of the branch; bench/profile_lora.py), so one
    word is drawn from torch's generator as the seed of a numpy SFC64 stream that fills the rest
    (~4 ns a word). Seeding from torch keeps what callers rely on: ``torch.manual_seed`` reproduces the
    masks, and gradient checkpointing, which restores torch's RNG state before recomputing, redraws
    them identically. Other devices fill the words with their own generator (Philox on CUDA), in one
    traceable op; so does any device under ``torch.compile`` (numpy would break the graph).
    """
    if device.type != "cpu" or torch.compiler.is_compiling():
        return torch.randint(-(2**63), 2**63 - 1, (count,), dtype=torch.int64, device=device)
    seed = int(torch.empty((), dtype=torch.int64).random_())  # one draw from torch's CPU generator
    raw = np.random.SFC64(seed).random_raw(count)  # uint64 (count,)
    return torch.from_numpy(raw.view(np.int64))


def pack_keep(keep: torch.Tensor) -> torch.Tensor:
    """The form a branch saves a bool keep mask in for backward: 8 elements a byte (uint8, numpy's
    big-endian bit order) on CPU, where packing costs ~0.06 ms per 1024 × 512 mask; the bool mask
    itself elsewhere (and under ``torch.compile``). Undone by :func:`unpack_keep`."""
    if keep.device.type != "cpu" or torch.compiler.is_compiling():
        return keep
    return torch.from_numpy(np.packbits(keep.numpy(), axis=None))


def unpack_keep(saved: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A fresh 0/1 mask of ``shape`` and ``dtype`` from what :func:`pack_keep` returned."""
    if saved.dtype == torch.bool:
        return saved.view(torch.uint8).to(dtype).view(shape)
    bits = np.unpackbits(saved.numpy(), count=shape.numel())  # uint8 0/1, one element a byte
    return torch.from_numpy(bits).to(dtype).view(shape)
