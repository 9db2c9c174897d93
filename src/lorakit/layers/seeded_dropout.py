"""Dropout masks kept as a seed, drawn and applied by a small C kernel (``csrc/dropout.c``).

A LoRA branch needs its input's dropout mask three times: x ⊙ m for the A GEMM in forward, and in
backward ∂x ⊙ m and x ⊙ m again for ∂A. The dense path (``dropout.py``) draws random words, compares
them into a bool mask, widens it to a float mask and multiplies, then packs the bools for backward and
unpacks them there: about a dozen passes over an (N, in) tensor per projection, more than the rank-16
GEMMs cost (docs/PERFORMANCE.md). Here the mask of element i is a pure function of (seed, i) — a
counter-based 32-bit hash per two elements (two keyed rounds of lowbias32), cut into two 16-bit
lanes, dropped when a lane is below the threshold (the same lane rule and the same
p̃ = round(p·2¹⁶)/2¹⁶ as ``keep_mask``); AVX-512 and AVX2 builds of the hash run where the CPU has
them (one pass over 1024 × 576 fp32: 0.35 / 0.53 ms, portable C 1.5 ms). So a
:class:`SeededMask` is four numbers, nothing is saved for backward, and each use is one pass that copies
the kept elements bit for bit (dtype-blind: 4- and 2-byte elements) and zeroes the rest. 1/(1−p̃) is
applied to the rank-sized product by the branch.

The seed is one draw from torch's CPU generator, so ``torch.manual_seed`` reproduces the masks and
gradient checkpointing (which restores the RNG state before recomputing) redraws the same seed.
:func:`draw` returns None — and the dense path runs — off CPU, under ``torch.compile``, for other dtypes,
or when no C compiler is available (``_cbuild``).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from .._cbuild import Kernel
from ..errors import ConfigError

SOURCE = Path(__file__).with_name("csrc") / "dropout.c"
_KERNEL = Kernel(SOURCE, lambda lib: _setup(lib), "dropout kernel")
kernel = _KERNEL.library  # the loaded ctypes.CDLL, or None (built and tried once per process)
unavailable_reason = _KERNEL.unavailable_reason  # why it is None ("" when it loaded)
reset = _KERNEL.reset  # forget it (tests: try again with another compiler or cache)
ABI = 3  # LK_ABI in the source
LANES = 1 << 16  # values a 16-bit lane takes
_M32 = (1 << 32) - 1
_WIDTH = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass(frozen=True, eq=False)
class SeededMask:
    """The dropout mask of a tensor of ``shape``: element i is kept iff lane i of the seed's stream
    is ≥ ``threshold``; kept elements count ``scale`` = 1/(1 − p̃) times."""

    seed: int  # 0 ≤ seed < 2⁶⁴
    threshold: int  # round(p·2¹⁶) − 2¹⁵
    scale: float
    shape: torch.Size

    def drop(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x with its dropped elements zeroed and the kept ones unscaled, into ``out`` (may be x).
        x and out: contiguous CPU tensors of ``shape``'s size, fp32/bf16/fp16."""
        out = torch.empty_like(x) if out is None else out
        lib = kernel()
        if lib is None or not _fits(x, self.shape) or not _fits(out, self.shape) or out.dtype != x.dtype:
            raise ValueError(f"SeededMask.drop: cannot apply a mask of {tuple(self.shape)} to "
                             f"{x.dtype} {tuple(x.shape)} (contiguous CPU fp32/bf16/fp16 only)")
        if _WIDTH[x.dtype] == 2:
            lib.lk_drop16(x.data_ptr(), out.data_ptr(), x.numel(), self.seed, self.threshold)
        elif out.data_ptr() == x.data_ptr():
            lib.lk_drop32_inplace(x.data_ptr(), x.numel(), self.seed, self.threshold)
        else:  # the C loop assumes no partial overlap
            if _overlap(x, out):
                raise ValueError("SeededMask.drop: out overlaps x without being x")
            lib.lk_drop32(x.data_ptr(), out.data_ptr(), x.numel(), self.seed, self.threshold)
        return out

    def keep(self) -> torch.Tensor:
        """The bool keep mask, dense (for code that needs it as a tensor)."""
        keep = torch.empty(self.shape, dtype=torch.bool)
        lib = kernel()
        if lib is None:
            raise ValueError("SeededMask.keep: the dropout kernel is not available in this process")
        lib.lk_keep8(keep.data_ptr(), keep.numel(), self.seed, self.threshold)
        return keep

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The mask as values 0 or ``scale`` (what ``dropout.dropout_mask`` returns)."""
        return self.keep().view(torch.uint8).to(dtype).mul_(self.scale)

    def __rmul__(self, x: torch.Tensor) -> torch.Tensor:
        # ``x * mask`` keeps working for adapter kinds written against dense masks (also on a
        # reshaped x of the mask's size, e.g. the (N, in) view of a (B, T, in) input).
        dense = self.to_dense(x.dtype).to(x.device)
        return x * (dense.view(x.shape) if x.numel() == dense.numel() else dense)


def draw(x: torch.Tensor, p: float) -> SeededMask | None:
    """A fresh mask for ``x`` with drop probability ``p``, or None where the kernel cannot serve x."""
    if (x.device.type != "cpu" or x.dtype not in _WIDTH or torch.compiler.is_compiling()
            or kernel() is None):
        return None
    threshold, scale = lane_rule(p)
    seed = int(torch.empty((), dtype=torch.int64).random_())  # one draw from torch's CPU generator
    return SeededMask(seed, threshold, scale, x.shape)


def lane_rule(p: float) -> tuple[int, float]:
    """(threshold, scale) for drop probability p: a signed 16-bit lane below the threshold drops its
    element, so p̃ = round(p·2¹⁶)/2¹⁶; kept elements count 1/(1 − p̃). Shared with the dense path."""
    dropped = round(p * LANES)  # how many of the 2¹⁶ lane values mean "drop"
    return dropped - LANES // 2, 1.0 / (1.0 - dropped / LANES)


def _fits(t: torch.Tensor, shape: torch.Size) -> bool:
    return t.device.type == "cpu" and t.dtype in _WIDTH and t.is_contiguous() and t.numel() == shape.numel()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def use_build(level: int) -> int:
    """Run the kernel's builds up to ``level`` only (0 portable C, 1 AVX2, 2 AVX-512; capped by the CPU)
    and return the one now in use; -1 when the kernel is not loaded. For tests and A/B benches: every
    build gives the same bits."""
    if isinstance(level, bool) or not isinstance(level, int) or level not in (0, 1, 2):
        raise ConfigError(f"use_build(level={level!r}): give 0 (portable C), 1 (AVX2) or 2 (AVX-512).")
    lib = kernel()
    return -1 if lib is None else int(lib.lk_dropout_use(level))


def _setup(lib: ctypes.CDLL) -> bool:
    p, i64, u64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int32
    lib.lk_dropout_abi.restype = ctypes.c_int
    lib.lk_dropout_use.argtypes, lib.lk_dropout_use.restype = [ctypes.c_int], ctypes.c_int
    for fn in (lib.lk_drop32, lib.lk_drop16):
        fn.argtypes, fn.restype = [p, p, i64, u64, i32], None
    for fn in (lib.lk_drop32_inplace, lib.lk_keep8):
        fn.argtypes, fn.restype = [p, i64, u64, i32], None
    return lib.lk_dropout_abi() == ABI and _self_test(lib)


def _lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _self_test(lib: ctypes.CDLL) -> bool:
    """69 elements (two whole AVX-512 groups, an AVX2 group and an odd tail), every entry point,
    against the hash in Python."""
    seed, thr, n = 0xDEADBEEF12345678, -(1 << 14), 69
    k0, k1 = seed & _M32, seed >> 32
    want = []
    for i in range(n):
        h = _lowbias32((_lowbias32(((i // 2) * 0x9E3779B9 & _M32) ^ k0) + k1) & _M32)
        lane = (h >> (16 * (i % 2))) & 0xFFFF
        want.append((lane - LANES if lane >= LANES // 2 else lane) >= thr)
    keep = torch.empty(n, dtype=torch.uint8)
    lib.lk_keep8(keep.data_ptr(), n, seed, thr)
    k = torch.tensor(want)
    x32, x16 = torch.arange(1, n + 1, dtype=torch.float32), torch.arange(1, n + 1, dtype=torch.bfloat16)
    y32, y16, z32 = torch.empty_like(x32), x16.clone(), x32.clone()
    lib.lk_drop32(x32.data_ptr(), y32.data_ptr(), n, seed, thr)
    lib.lk_drop32_inplace(z32.data_ptr(), n, seed, thr)
    lib.lk_drop16(y16.data_ptr(), y16.data_ptr(), n, seed, thr)
    return (keep.bool().tolist() == want and torch.equal(y32, x32 * k) and torch.equal(z32, x32 * k)
            and torch.equal(y16, x16 * k))
