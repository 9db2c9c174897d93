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
dequantize (nothing but the quantized tensors is saved).

Two rebuilds a step instead of three under gradient checkpointing: a checkpointed block's forward
runs twice (the first forward, then its recomputation right before the block's backward). During the
recomputation (``recompute_context``, given to ``torch.utils.checkpoint`` as ``context_fn`` by
``prepare_for_kbit_training``) the tiles are written into a whole-W buffer instead of the scratch,
and the backward that follows reads them from there instead of dequantizing again. The buffers come
from a per-thread pool of at most ``KEEP_BYTES`` (256 MiB: all of a 135M model's block, q/k/v of a 7B
one), reused from block to block and step to step — a fresh buffer would cost more in page faults
than the rebuild it saves (measured ~1 ms per MB on the shared box) — so the memory is bounded and
resident, and one block's weights at most are kept at a time. Without checkpointing nothing is kept
(every W would stay alive until its backward). Results are bit-identical either way: the backward
multiplies the same tiles in the same order.

Used by ``QuantLinear`` for NF4/FP4 weights on the CPU; other devices and int8 take the whole-matrix
path of ``linear._DequantLinear`` (a GPU has the bandwidth, and its kernels are launched per tensor).
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch

from . import kernels4, kernels4_cpu

#: Elements of one dequantized tile: 512 K = 2 MB fp32 (measured best of 64 K…512 K on the 2-core box).
TILE_ELEMENTS = 1 << 19
MIN_ROWS = 64  # thinner GEMM tiles lose more to per-call overhead than they gain in cache
#: Bytes of dequantized weights a checkpoint recomputation may keep for the backward that follows it.
KEEP_BYTES = 256 << 20
_scratch = threading.local()


class _Kept(threading.local):
    """Per thread: whether a checkpoint recomputation is running, the W kept by it, and the pool of
    buffers they live in (``held`` counts every pooled byte, in use or free; never above the budget)."""

    def __init__(self):
        self.recomputing = False
        self.budget = KEEP_BYTES
        self.weights: dict[tuple, torch.Tensor] = {}  # (codes' data_ptr, dtype) -> W (out*in,)
        self.free: dict[tuple, list[torch.Tensor]] = {}  # (numel, dtype) -> idle buffers
        self.held = 0

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor | None:
        """A pooled (numel,) buffer, or None when it would not fit the budget."""
        idle = self.free.get((numel, dtype))
        if idle:
            return idle.pop()
        need = numel * torch.empty(0, dtype=dtype).element_size()
        for key in [k for k, v in self.free.items() if v]:  # make room: drop idle buffers of other sizes
            while self.held + need > self.budget and self.free[key]:
                buf = self.free[key].pop()
                self.held -= buf.numel() * buf.element_size()
        if self.held + need > self.budget:
            return None
        self.held += need
        return torch.empty(numel, dtype=dtype)

    def give_back(self, buf: torch.Tensor) -> None:
        self.free.setdefault((buf.numel(), buf.dtype), []).append(buf)

    def release(self) -> None:
        """Back to the pool: every kept W (the previous block's; its backward is over)."""
        for buf in self.weights.values():
            self.give_back(buf)
        self.weights.clear()


_kept = _Kept()


class KeepForBackward:
    """The recomputation context: the 4-bit matmuls inside keep W (within ``budget`` bytes) for their
    backward. Re-enterable (a graph kept with ``retain_graph`` recomputes again)."""

    def __init__(self, budget: int | None = None):
        self.budget = KEEP_BYTES if budget is None else int(budget)
        self._prev: list[tuple[bool, int]] = []

    def __enter__(self):
        # A new block is recomputed only once the later block's backward is done: its W are stale.
        _kept.release()
        self._prev.append((_kept.recomputing, _kept.budget))
        _kept.recomputing, _kept.budget = True, self.budget
        return self

    def __exit__(self, *exc):
        _kept.recomputing, _kept.budget = self._prev.pop()
        return False


def recompute_context(budget: int | None = None):
    """``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant): nothing in the first forward,
    ``KeepForBackward`` in the recomputation."""
    return contextlib.nullcontext(), KeepForBackward(budget)


def pooled_bytes() -> int:
    """Bytes this thread's pool of kept-W buffers holds now (resident until ``clear_pool``)."""
    return _kept.held


def clear_pool() -> None:
    """Free this thread's kept-W buffers (after training; the next recomputation refills the pool)."""
    _kept.weights.clear()
    _kept.free.clear()
    _kept.held = 0


def kept_bytes(weight_bytes: list[int], budget: int | None = None) -> int:
    """What a recomputation keeps for one block whose 4-bit weights (forward order) dequantize to
    ``weight_bytes``: first fit within the budget, as ``_Kept.take`` hands buffers out (for estimates)."""
    budget, held = KEEP_BYTES if budget is None else budget, 0
    for b in weight_bytes:
        if held + b <= budget:
            held += b
    return held


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
        self.q = q
        self.out_f, self.in_f = lay.shape
        self.n, self.bs, self.qt, self.dtype = lay.numel, lay.blocksize, lay.quant_type, compute_dtype
        self.packed = q.packed.view(-1)  # ((n+1)/2,) uint8
        self.rows = tile_rows(self.out_f, self.in_f, self.bs, tokens)

    def kept(self, w: torch.Tensor):
        """Yield the same tiles as :meth:`tiles`, read from a whole dequantized W (out*in,)."""
        for o0 in range(0, self.out_f, self.rows):
            o1 = min(o0 + self.rows, self.out_f)
            yield o0, o1, w[o0 * self.in_f: o1 * self.in_f].view(o1 - o0, self.in_f)

    def tiles(self, into: torch.Tensor | None = None):
        """Yield (o0, o1, W[o0:o1]) with W's tile in a scratch buffer valid until the next tile (or
        written into ``into`` (out*in,), where it stays)."""
        self.absmax = self.q.absmax.contiguous()  # (blocks,) fp32; recovered once per call if double-quantized
        elems = self.rows * self.in_f
        buf = _buffer(elems, self.dtype, 0)
        index = _buffer(-(-elems // 2), torch.int64, 1)
        f32 = buf if self.dtype == torch.float32 else _buffer(elems, torch.float32, 2)
        whole = self.n - self.n % self.bs  # the short last block (if any) takes the torch path
        for o0 in range(0, self.out_f, self.rows):
            o1 = min(o0 + self.rows, self.out_f)
            start, stop = o0 * self.in_f, o1 * self.in_f
            full, m = min(stop, whole), stop - start
            tile = buf[:m] if into is None else into[start:stop]
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
        keep = None
        if _kept.recomputing:  # a checkpoint recomputation: W goes to a pooled buffer for the backward
            if ctx.needs_input_grad[0]:
                keep = _kept.take(plan.n, compute_dtype)
        elif _kept.weights:  # a first forward: whatever the last recomputation kept is stale
            _kept.release()
        # Allocated in the output's shape and returned as is: a view of an (N, out) tensor would make the
        # LoRA branch clone it (its in-place add needs a base-less output), ~0.1 s per step at 135M.
        y = x2.new_empty(*x.shape[:-1], plan.out_f)  # (..., out)
        y2 = y.view(-1, plan.out_f)  # (N, out)
        for o0, o1, w in plan.tiles(into=keep):
            torch.mm(x2, w.T, out=y2[:, o0:o1])  # (N, in) @ (in, rows), written into y's columns in place
        if keep is not None:
            old = _kept.weights.pop((q.packed.data_ptr(), compute_dtype), None)  # the same W called twice
            if old is not None:
                _kept.give_back(old)
            _kept.weights[(q.packed.data_ptr(), compute_dtype)] = keep
        ctx.layout, ctx.compute_dtype, ctx.n_tensors = layout, compute_dtype, len(tensors)
        ctx.save_for_backward(*tensors)  # uint8 codes + small fp32 statistics only
        return y

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            layout = ctx.layout
            q = layout.build(dict(zip(layout.tensor_names, ctx.saved_tensors)))
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.compute_dtype)  # (N, out)
            plan = _Plan(q, ctx.compute_dtype, g.shape[0])
            kept = _kept.weights.pop((q.packed.data_ptr(), ctx.compute_dtype), None)  # from the recomputation
            gx = g.new_zeros(g.shape[0], plan.in_f)  # (N, in)
            for o0, o1, w in (plan.tiles() if kept is None else plan.kept(kept)):
                gx.addmm_(g[:, o0:o1], w)  # (N, rows) @ (rows, in): the same tiles, the same order
            if kept is not None:
                _kept.give_back(kept)
            grad_x = gx.view(*grad_out.shape[:-1], plan.in_f)
        return (grad_x, None, None) + (None,) * ctx.n_tensors


def applies(layout, device: torch.device) -> bool:
    """Whether the tiled path serves this weight: a 2-D NF4/FP4 weight on a little-endian CPU."""
    return (getattr(layout, "quant_type", None) in ("nf4", "fp4") and len(layout.shape) == 2
            and device.type == "cpu" and kernels4._on_cpu(torch.empty(0)))
