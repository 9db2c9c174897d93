"""``x Wᵀ`` for a 4-bit weight on the CPU, one cache-sized tile of W at a time.

    y[:, o0:o1] = x · W[o0:o1]ᵀ          W[o0:o1] = code · absmax, dequantized into a reusable buffer
    ∂L/∂x       = Σ_tiles ∂L/∂y[:, o0:o1] · W[o0:o1]

QLoRA (Dettmers et al. 2023, §3, eq. 5-6) dequantizes W for every matmul and never keeps it. Doing
that for the whole (out, in) matrix writes W in full precision to fresh memory and reads it back for
the GEMM: on a CPU that is memory-bound (measured on the shared 2-core test box: a 3.5 MB fp32 W
took 12 ms to dequantize, 6x its GEMM with 64 tokens), and it allocates an (out, in) temporary per
call. Here W is rebuilt in tiles of ``rows`` output rows (≈ 2 MB, cache-resident) straight into
a per-thread scratch buffer, and each tile is consumed by its GEMM while it is still in cache. Only
the uint8 codes stream from memory; no (out, in) tensor is ever allocated. Forward and backward both
dequantize (nothing but the quantized tensors is saved), so with gradient checkpointing W is rebuilt
three times a step, each time tile by tile.

Used by ``QuantLinear`` for NF4/FP4 weights on the CPU; other devices and int8 take the whole-matrix
path of ``linear._DequantLinear`` (a GPU has the bandwidth, and its kernels are launched per tensor).
"""

from __future__ import annotations

import math
import threading

import torch

from . import kernels4, kernels4_cpu

#: Elements of one dequantized tile: 512 K = 2 MB fp32 (measured best of 64 K…512 K on the 2-core box).
TILE_ELEMENTS = 1 << 19
MIN_ROWS = 64  # thinner GEMM tiles lose more to per-call overhead than they gain in cache
_scratch = threading.local()


def tile_rows(out_features: int, in_features: int, blocksize: int, tokens: int) -> int:
    """Output rows per tile: about TILE_ELEMENTS weights (at least as many as x has, so x is not re-read
    more often than W is read), a multiple of the rows that hold whole blocks, ≥ 64 for GEMM efficiency."""
    align = blocksize // math.gcd(in_features, blocksize)  # rows whose flat span is whole blocks
    want = max(TILE_ELEMENTS, tokens * in_features) // in_features
    rows = max(MIN_ROWS, want)
    rows = -(-rows // align) * align
    return min(rows, out_features)


def _buffer(numel: int, dtype: torch.dtype, slot: int) -> torch.Tensor:
    """A per-thread reusable scratch tensor (grows to the largest tile asked for, never shrinks)."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        buf = bufs[(slot, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


class _Plan:
    """What the tiles of one call need: codes, absmax, the shape, the tile height."""

    def __init__(self, q, compute_dtype: torch.dtype, tokens: int):
        lay = q.layout
        self.out_f, self.in_f = lay.shape
        self.n, self.bs, self.qt, self.dtype = lay.numel, lay.blocksize, lay.quant_type, compute_dtype
        self.packed = q.packed.view(-1)  # ((n+1)/2,) uint8
        self.absmax = q.absmax.contiguous()  # (blocks,) fp32; recovered once per call if double-quantized
        self.rows = tile_rows(self.out_f, self.in_f, self.bs, tokens)

    def tiles(self):
        """Yield (o0, o1, W[o0:o1]) with W's tile in a scratch buffer valid until the next tile."""
        elems = self.rows * self.in_f
        buf = _buffer(elems, self.dtype, 0)
        index = _buffer(-(-elems // 2), torch.int64, 1)
        f32 = buf if self.dtype == torch.float32 else _buffer(elems, torch.float32, 2)
        whole = self.n - self.n % self.bs  # the short last block (if any) takes the torch path
        for o0 in range(0, self.out_f, self.rows):
            o1 = min(o0 + self.rows, self.out_f)
            start, stop = o0 * self.in_f, o1 * self.in_f
            full, m = min(stop, whole), stop - start
            tile = buf[:m]
            if full > start:
                k = full - start
                kernels4_cpu.dequantize_span(self.packed, self.absmax, self.bs, self.qt, start, full, tile[:k],
                                             index[: k // 2], f32[:k])
            if full < stop:
                tile[full - start:].copy_(kernels4.dequantize_tail(self.packed, self.absmax, self.n, self.bs,
                                                                   self.qt))
            yield o0, o1, tile.view(o1 - o0, self.in_f)


class TiledDequantLinear4(torch.autograd.Function):
    """``x Wᵀ`` (no bias) for a 4-bit W on the CPU; saves only the quantized tensors."""

    @staticmethod
    def forward(ctx, x, layout, compute_dtype, *tensors):
        # x: (..., in) in compute_dtype  ->  (..., out)
        q = layout.build(dict(zip(layout.tensor_names, tensors)))
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        plan = _Plan(q, compute_dtype, x2.shape[0])
        y_t = x2.new_empty(plan.out_f, x2.shape[0])  # (out, N): each tile fills contiguous rows
        for o0, o1, w in plan.tiles():
            torch.mm(w, x2.T, out=y_t[o0:o1])  # (rows, in) @ (in, N)
        ctx.layout, ctx.compute_dtype, ctx.n_tensors = layout, compute_dtype, len(tensors)
        ctx.save_for_backward(*tensors)  # uint8 codes + small fp32 statistics only
        return y_t.T.contiguous().view(*x.shape[:-1], plan.out_f)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            layout = ctx.layout
            q = layout.build(dict(zip(layout.tensor_names, ctx.saved_tensors)))
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.compute_dtype)  # (N, out)
            plan = _Plan(q, ctx.compute_dtype, g.shape[0])
            gx = g.new_zeros(g.shape[0], plan.in_f)  # (N, in)
            for o0, o1, w in plan.tiles():
                gx.addmm_(g[:, o0:o1], w)  # (N, rows) @ (rows, in)
            grad_x = gx.view(*grad_out.shape[:-1], plan.in_f)
        return (grad_x, None, None) + (None,) * ctx.n_tensors


def applies(layout, device: torch.device) -> bool:
    """Whether the tiled path serves this weight: a 2-D NF4/FP4 weight on a little-endian CPU."""
    return (getattr(layout, "quant_type", None) in ("nf4", "fp4") and len(layout.shape) == 2
            and device.type == "cpu" and kernels4._on_cpu(torch.empty(0)))
