"""The CPU side of ``kernels4``: the same arithmetic in numpy, on whole blocks, over a thread pool.

Why numpy and our own threads rather than torch ops: torch parallelizes every op above 32k elements
with OpenMP, and a cache-sized chunk loop issues thousands of such ops; on a busy machine each
parallel region waits for a descheduled thread and the loop slows down ~10x (measured here). numpy ops run on the
calling thread and release the GIL, so ``torch.get_num_threads()`` Python threads each work through
their own range of chunks with no nested parallelism. Lookups use ``np.take`` (several times faster
than torch's CPU gathers): two weights per gather from a 256-entry table indexed by the packed byte.

Every step is IEEE fp32 arithmetic with the same operation order as the torch path, so both are
bit-exact with each other (and with bitsandbytes); the final cast to bf16/fp16 is torch's
(round to nearest even), on slices small enough that torch runs it on the calling thread.

Dequantization first tries the compiled lookup kernel (``ckernel``: one pass per packed byte, the same
results); the numpy code below is its fallback (no C compiler, ``LORAKIT_NO_CKERNEL=1``).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import ckernel
from .codebooks import code_table, midpoints, sorted_codes

CHUNK = 1 << 16  # elements per step: 256 kB of fp32 temporaries per thread, cache-resident
PARALLEL_MIN = 1 << 19  # below this many elements one thread does it all
_TINY = np.float32(1e-38)
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def run_ranges(total: int, job) -> None:
    """Call ``job(start, stop)`` over [0, total) split into whole CHUNKs, one range per thread."""
    workers = min(torch.get_num_threads(), 8) if total >= PARALLEL_MIN else 1
    per = -(-total // (workers * CHUNK)) * CHUNK
    ranges = [(s, min(s + per, total)) for s in range(0, total, per)]
    if len(ranges) == 1:
        job(*ranges[0])
        return
    pool = _pool(len(ranges))
    for f in [pool.submit(job, s, e) for s, e in ranges]:
        f.result()


def _pool(size: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE < size:
        _POOL, _POOL_SIZE = ThreadPoolExecutor(max_workers=size, thread_name_prefix="lorakit-quant"), size
    return _POOL


# -- quantize --------------------------------------------------------------------------------------
def _as_f32(src: np.ndarray, dtype: torch.dtype, out: np.ndarray) -> np.ndarray:
    """A slice of the input (numpy view of its bits) as fp32, exactly."""
    if dtype == torch.float32:
        return src
    if dtype == torch.bfloat16:  # bf16 is the top half of an fp32
        np.left_shift(src, 16, out=out.view(np.uint32), dtype=np.uint32)
        return out
    np.copyto(out, src.view(np.float16))
    return out


def quantize_blocks(flat: torch.Tensor, full: int, blocksize: int, quant_type: str,
                    packed: torch.Tensor, absmax: torch.Tensor) -> None:
    """Whole blocks: fill packed[: full//2] and absmax[: full//bs] from flat[:full]."""
    if full == 0:
        return
    raw = flat.numpy() if flat.dtype == torch.float32 else flat.view(torch.int16).numpy().view(np.uint16)
    order = sorted_codes(quant_type)
    plan = (np.float32(midpoints(quant_type)), order[0],
            [(order[i + 1] - order[i]) % 256 for i in range(15)], quant_type == "nf4")
    run_ranges(full, functools.partial(_quantize_range, raw, flat.dtype, blocksize, plan,
                                       packed.numpy(), absmax.numpy()))


def _quantize_range(raw, dtype, bs, plan, packed, absmax, start, stop) -> None:
    chunk = min(CHUNK, stop - start)
    f32 = np.empty(chunk, np.float32)
    scaled = np.empty(chunk, np.float32)
    above = np.empty(chunk, np.bool_)
    codes = np.empty(chunk, np.uint8)
    step_buf = np.empty(chunk, np.uint8)
    with np.errstate(all="ignore"):  # inf/NaN inputs are reported by the caller, via absmax
        for s in range(start, stop, chunk):
            _quantize_chunk(raw, dtype, bs, plan, packed, absmax, s, min(s + chunk, stop),
                            f32, scaled, above, codes, step_buf)


def _quantize_chunk(raw, dtype, bs, plan, packed, absmax, s, e, f32, scaled, above, codes, step_buf) -> None:
    """Elements [s, e) (whole blocks) with the caller's reusable buffers."""
    bounds, first, steps, unit_steps = plan
    m, blocks = e - s, slice(s // bs, e // bs)
    x = _as_f32(raw[s:e], dtype, f32[:m]).reshape(-1, bs)  # (blocks, bs)
    amax = np.max(np.abs(x, out=scaled[:m].reshape(-1, bs)), axis=1, out=absmax[blocks])
    recip = np.float32(1.0) / np.maximum(amax, _TINY)  # fp32, as torch's 1.0 / t
    sc = np.multiply(x, recip[:, None], out=scaled[:m].reshape(-1, bs)).reshape(-1)
    # nearest code, ties to the lower value: count the boundaries strictly below (see kernels4)
    q = codes[:m]
    q.fill(first)
    for bound, step in zip(bounds, steps):
        np.greater(sc, bound, out=above[:m])
        if unit_steps:
            np.add(q, above[:m], out=q)
        else:  # FP4: add the step to the next sorted code; uint8 wraps mod 256 onto it
            np.add(q, np.multiply(above[:m], np.uint8(step), out=step_buf[:m]), out=q)
    hi = np.left_shift(q[0::2], 4, out=step_buf[: m // 2])
    np.bitwise_or(hi, q[1::2], out=packed[s // 2: e // 2])


# -- dequantize ------------------------------------------------------------------------------------
@functools.cache
def pair_table(quant_type: str) -> np.ndarray:
    """(256,) uint64: the two fp32 values one packed byte stands for (high nibble first), read as one
    8-byte item so that one ``np.take`` writes two weights. 2 kB: it stays in L1 whatever the codes.
    (A 65536-entry table of four values per uint16 is 1 MB and misses the cache on real weights,
    whose codes are close to random: measured 6x slower.)"""
    code = code_table(quant_type)
    b = torch.arange(256)
    pair = torch.stack([code[b >> 4], code[b & 15]], dim=1).contiguous()  # (256, 2) fp32
    return pair.numpy().view(np.uint64).reshape(256)


def dequantize_blocks(packed: torch.Tensor, absmax: torch.Tensor, full: int, blocksize: int, quant_type: str,
                      out: torch.Tensor) -> None:
    """Whole blocks: out[:full] = code · absmax, rounded once to out's dtype."""
    if full == 0:
        return
    absmax = absmax.contiguous()
    codes = packed[: full // 2].numpy()  # (full/2,) uint8, two codes each
    numpy_range = functools.partial(_dequantize_range, codes, absmax.numpy(), blocksize, pair_table(quant_type), out)

    def job(start: int, stop: int) -> None:  # the compiled kernel, else numpy (per thread's range)
        if not ckernel.dequant4(packed, absmax, blocksize, quant_type, start, stop, out[start:stop]):
            numpy_range(start, stop)

    run_ranges(full, job)


_SERIAL = 32000  # torch runs an elementwise op on one thread below 32768 elements (its grain size)


def _dequantize_range(codes, absmax, bs, table, out, start, stop) -> None:
    chunk = min(CHUNK, stop - start)
    index = np.empty(chunk // 2, np.intp)  # np.take converts narrower indices slowly, on every call
    fp32_out = out.dtype == torch.float32
    if not fp32_out:
        vals = torch.empty(chunk, dtype=torch.float32)  # reusable fp32 buffer, cache-resident
    for s in range(start, stop, chunk):
        e = min(s + chunk, stop)
        m = e - s
        index[: m // 2] = codes[s // 2: e // 2]
        # gather two weights per byte, straight into an fp32 output, else into the buffer
        dst = out[s:e] if fp32_out else vals[:m]
        np.take(table, index[: m // 2], out=dst.numpy().view(np.uint64), mode="clip")
        v = dst.numpy().reshape(-1, bs)  # (blocks, bs)
        np.multiply(v, absmax[s // bs: e // bs, None], out=v)
        if not fp32_out:  # the one rounding (nearest even), by torch's vectorized cast, single-threaded
            for j in range(0, m, _SERIAL):
                out[s + j: s + min(j + _SERIAL, m)].copy_(vals[j: min(j + _SERIAL, m)])



def dequantize_span(packed: torch.Tensor, absmax: torch.Tensor, bs: int, quant_type: str, start: int, stop: int,
                    out: torch.Tensor, index: torch.Tensor, f32: torch.Tensor) -> None:
    """Whole blocks [start, stop) of the flat tensor into ``out`` (stop - start,), on the calling thread.

    For tiles of a weight used right away (``autograd4``): ``out``, ``index`` ((stop-start)/2,) int64
    and ``f32`` (stop-start,) fp32 (only read when ``out`` is not fp32) are small reusable buffers, so
    every value is written to and read from cache, never to a fresh page. The compiled kernel when it
    serves ``out``'s dtype; else torch does the uint8 → int64 widening and the absmax multiply
    (vectorized, ~2x numpy's broadcast), ``np.take`` the lookup.
    """
    if ckernel.dequant4(packed, absmax, bs, quant_type, start, stop, out):
        return
    index.copy_(packed[start // 2: stop // 2])  # (m/2,) byte → int64 index into the pair table
    dst = out if out.dtype == torch.float32 else f32
    np.take(pair_table(quant_type), index.numpy(), out=dst.numpy().view(np.uint64), mode="clip")
    dst.view(-1, bs).mul_(absmax[start // bs: stop // bs, None])  # (blocks, bs) · (blocks, 1)
    if dst is not out:
        out.copy_(dst)  # the one rounding to bf16/fp16, nearest even

