"""The compiled 4-bit lookup kernel (``csrc/dequant4.c``), built on first use by ``_cbuild``.

    lib = library()          # a ctypes.CDLL, or None (then kernels4_cpu keeps its numpy path)
    dequant4(packed, absmax, bs, "nf4", start, stop, out)   # True if the C kernel did it

Why C: the numpy path makes several passes per element (uint8 → int64 index copy, ``np.take`` of byte
pairs, absmax multiply, cast); this kernel reads each packed byte once and writes the finished values
(fp32; bf16 or fp16 where the SIMD loop runs), bit-identical to the numpy path: the same single fp32
multiply (``-ffp-contract=off``, no ``-ffast-math``), and 16-bit casts that round to nearest even like
torch's.

``_cbuild`` compiles it with ``$CC`` (default ``cc``) into ``~/.cache/lorakit``, checks the cached
file's digest and runs the self-test below. No compiler, a failed build or load, or
``LORAKIT_NO_CKERNEL=1`` → ``None``, logged once at debug level, and the numpy path runs. ctypes
releases the GIL during the call, so ``kernels4_cpu.run_ranges``' threads run the kernel in parallel.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
import torch

from .. import _cbuild
from .codebooks import code_table, dynamic_map

SOURCE = Path(__file__).with_name("csrc") / "dequant4.c"
_KERNEL = _cbuild.Kernel(SOURCE, lambda lib: _setup(lib), "4-bit lookup kernel")
library = _KERNEL.library  # the loaded ctypes.CDLL, or None (built and tried once per process)
unavailable_reason = _KERNEL.unavailable_reason  # why it is None ("" when it loaded)
reset = _KERNEL.reset  # forget it (tests: try again with another compiler or cache)
ABI = 1  # must match LK_ABI in the source
_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_P = ctypes.c_void_p
_I = ctypes.c_int64



def _setup(lib: ctypes.CDLL) -> bool:
    """Declare the C signatures; True if the ABI matches and the self-test passes."""
    lib.lk_abi.restype = ctypes.c_int
    lib.lk_simd_available.restype = ctypes.c_int
    lib.lk_dequant4.argtypes = [_P, _P, _P, _P, _I, _I, _I, _P, ctypes.c_int, ctypes.c_int]
    lib.lk_dequant4.restype = ctypes.c_int
    lib.lk_dequant8.argtypes = [_P, _P, _P, _I, _I, _P]
    lib.lk_dequant8.restype = None
    return lib.lk_abi() == ABI and _self_test(lib)


def _self_test(lib: ctypes.CDLL) -> bool:
    """Every byte value through both loops (portable and SIMD) and all output kinds, against torch."""
    packed = torch.arange(256, dtype=torch.uint8).repeat(2)  # 512 bytes = 1024 codes, 16 blocks of 64
    absmax = torch.linspace(0.01, 3.0, 16)
    for qt in ("nf4", "fp4"):
        code = code_table(qt)
        codes = torch.stack([packed >> 4, packed & 15], dim=1).view(-1).long()
        want = (code[codes].view(16, 64) * absmax[:, None]).view(-1)
        for dtype in _OUT_KIND:
            for simd in (0, 1):
                out = torch.empty(1024, dtype=dtype)
                done = _call4(lib, packed, absmax, 64, qt, 0, 1024, out, simd)
                if done and not torch.equal(out, want.to(dtype)):
                    return False
    return True


@functools.cache
def _tables(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """(16,) fp32 by code and (256, 2) fp32 by byte (high nibble first); kept alive for the C pointers."""
    code = code_table(quant_type).numpy().astype(np.float32)
    byte = np.arange(256)
    return np.ascontiguousarray(code), np.ascontiguousarray(np.stack([code[byte >> 4], code[byte & 15]], axis=1))


def _call4(lib, packed, absmax, bs, quant_type, start, stop, out, simd: int = 1) -> bool:
    table, pairs = _tables(quant_type)
    return bool(lib.lk_dequant4(packed.data_ptr() + start // 2, absmax.data_ptr(), table.ctypes.data,
                                pairs.ctypes.data, bs, start // bs, stop // bs, out.data_ptr(), _OUT_KIND[out.dtype],
                                simd))


def dequant4(packed: torch.Tensor, absmax: torch.Tensor, bs: int, quant_type: str, start: int, stop: int,
             out: torch.Tensor, simd: bool = True) -> bool:
    """Whole blocks [start, stop) of the flat tensor into ``out`` (stop - start,), on the calling thread.

    packed: (≥ stop/2,) uint8, absmax (≥ stop/bs,) fp32, both contiguous CPU tensors; ``out`` contiguous
    fp32/bf16/fp16. Returns False (nothing written) when the kernel is not available, or for a 16-bit
    ``out`` without the SIMD loop (torch's vectorized cast beats a scalar one)."""
    lib = library()
    if lib is None or out.dtype not in _OUT_KIND or not _fits(packed, absmax, bs, start, stop, out):
        return False
    return start == stop or _call4(lib, packed, absmax, bs, quant_type, start, stop, out, int(simd))


def _fits(packed, absmax, bs, start, stop, out) -> bool:
    """The C loop's assumptions: contiguous CPU buffers of the right types and sizes, whole blocks."""
    return (packed.dtype == torch.uint8 and absmax.dtype == torch.float32 and bs > 0 and bs % 2 == 0
            and start % bs == 0 and stop % bs == 0 and 0 <= start <= stop and packed.numel() >= stop // 2 and absmax.numel() >= stop // bs
            and out.numel() == stop - start and all(t.is_contiguous() and t.device.type == "cpu"
                                                    for t in (packed, absmax, out)))


@functools.cache
def _map(signed: bool) -> np.ndarray:
    return np.ascontiguousarray(dynamic_map(signed).numpy().astype(np.float32))


def dequant8(codes: torch.Tensor, absmax: torch.Tensor, bs: int, signed: bool) -> torch.Tensor | None:
    """``map[codes] · absmax`` per block of ``bs`` (n,) fp32, or None when the kernel is not available."""
    lib = library()
    if (lib is None or bs <= 0 or codes.dtype != torch.uint8 or absmax.dtype != torch.float32
            or codes.device.type != "cpu" or absmax.device.type != "cpu" or absmax.numel() < -(-codes.numel() // bs)):
        return None
    codes, absmax = codes.contiguous(), absmax.contiguous()
    out = torch.empty(codes.numel(), dtype=torch.float32)
    lib.lk_dequant8(codes.data_ptr(), absmax.data_ptr(), _map(signed).ctypes.data, bs, codes.numel(),
                    out.data_ptr())
    return out


def simd_available() -> bool:
    """Whether the kernel loaded and this CPU runs its SIMD loop (AVX2 + F16C): 16-bit outputs too."""
    lib = library()
    return bool(lib is not None and lib.lk_simd_available())
