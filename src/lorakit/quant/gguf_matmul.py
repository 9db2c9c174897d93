"""``x Wᵀ`` over GGUF blocks without ever holding the whole dequantized W.

``QuantLinear``'s generic autograd function dequantizes the full (out, in) weight in forward and
again in backward. For a GGUF base that is the step's largest transient: SmolLM2's tied output head
is 49,152 × 576 → 113 MiB of fp32 per use, and every freed multi-MiB weight raises glibc's mmap
threshold so later ones stay in the heap. Here W is dequantized a slab of rows at a time
(``SLAB_ELEMENTS`` weights, 4 MiB of fp32, one buffer reused for every slab), used at once and dropped:

    forward   y[..., r0:r1] = x @ deq(W[r0:r1])ᵀ           x (..., in) → y (..., out)
    backward  ∂x = Σ_slabs ∂y[..., r0:r1] @ deq(W[r0:r1])   (..., out) → (..., in)

Only the packed bytes are saved for backward (nothing dequantized outlives a slab), so peak memory
is one slab plus the activations. The weights are exactly ``gguf_codecs.dequantize``'s (rows are
independent, so slicing rows of blocks changes nothing); a slab that already covers the whole
weight is one ordinary dequantize + matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gguf_codecs import dequantize

#: Weights dequantized at a time (fp32: 4 MiB). Measured on SmolLM2 (forward + backward, 1 thread):
#: 2^16 → 1.5×, 2^18 → 1.15× the time of 2^20; 2^22 no faster. Small next to the model either way.
SLAB_ELEMENTS = 1 << 20


def slab_rows(shape: tuple[int, int]) -> int:
    return max(1, SLAB_ELEMENTS // shape[1])


def _slabs(layout, packed: torch.Tensor, dtype: torch.dtype, step: int | None = None):
    """Yield (r0, r1, W[r0:r1] dequantized in ``dtype``), ``step`` rows at a time (default
    :func:`slab_rows`), all slabs decoded into one reused buffer (fresh multi-MiB allocations cost
    page faults on every call): a slab is valid until the next one is drawn."""
    rows, cols = layout.shape
    step = step or slab_rows(layout.shape)
    buf = torch.empty(min(step, rows), cols, dtype=dtype, device=packed.device)
    for r0 in range(0, rows, step):
        part = packed[r0:r0 + step]
        n = part.shape[0]
        yield r0, r0 + n, dequantize(layout.quant_type, part, (n, cols), dtype, chunk_rows=step, out=buf[:n])


def row_tiles(layout, packed: torch.Tensor, dtype: torch.dtype, rows: int):
    """The frozen-head tile protocol of ``lorakit.losses`` over GGUF blocks: (v0, v1, W[v0:v1])."""
    return _slabs(layout, packed, dtype, rows)


class GGUFDequantLinear(torch.autograd.Function):
    """``x Wᵀ`` with W (GGUF blocks) dequantized slab by slab in forward and again in backward.
    Same call signature as ``QuantLinear``'s generic function: (x, layout, compute_dtype, packed)."""

    @staticmethod
    def forward(ctx, x, layout, compute_dtype, packed):
        ctx.layout, ctx.compute_dtype = layout, compute_dtype
        ctx.save_for_backward(packed)  # uint8 blocks only
        out = x.new_empty(*x.shape[:-1], layout.shape[0])  # (..., out)
        for r0, r1, w in _slabs(layout, packed, compute_dtype):
            out[..., r0:r1] = F.linear(x, w)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            (packed,) = ctx.saved_tensors
            grad_out = grad_out.to(ctx.compute_dtype)
            grad_x = None
            for r0, r1, w in _slabs(ctx.layout, packed, ctx.compute_dtype):
                part = grad_out[..., r0:r1] @ w  # (..., r1-r0) @ (r1-r0, in) -> (..., in)
                grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None, None, None
