"""glibc ``malloc`` settings that hand freed tensor memory back to the OS (QLoRA's CPU runs).

By default glibc raises its mmap threshold every time a large block is freed (up to 32 MB); after a
few steps, tensors below that size come from the heap, and freed ones stay resident unless they sit
at its top. Measured on SmolLM2-135M with QLoRA (the bench of docs/QUANT.md): the heap grew from
187 to 463 MB over three training steps with nothing alive in it that the step needed. Fixing the
threshold (every tensor of ≥ 1 MB gets its own mapping, unmapped on free) and trimming the heap
above 16 MB of free top stops that growth; the price is a page fault per fresh 4 kB page of those
tensors, which the tiled 4-bit matmul (``autograd4``) mostly avoids by reusing its scratch.

``SMALL_TENSORS`` (128 kB), what ``lorakit train quant=nf4|fp4|int8`` uses: at short sequences a
step's activations are 0.1-1 MB tensors (64 tokens × 576 × 4 B = 147 kB) and the LoRA gradients and
AdamW moments that outlive them land between them in the heap; with a 1 MB threshold the heap held
≈ 100 MB of free but resident holes after three SmolLM2 QLoRA steps (``mallinfo2``: 355 MB arena,
109 MB free) and the step peak grew by 30-50 MB a step for the first steps; at 128 kB: 256 MB arena,
26 MB free, step peak 236-244 MB above imports instead of 295-324 (docs/QUANT.md), at the same speed
of the NF4 matmul (it reuses its scratch). The GGUF codecs make 0.1-1 MB temporaries, which then
page-fault on every call (a Q4_1 1536 × 576 layer, forward + backward: 28 ms instead of 11 ms), and
its 4 MB slab buffers do so under any fixed threshold (a SmolLM2 Q4_1 step: 6 s with glibc's dynamic
threshold, 19-22 s with 1 MB or 128 kB), so ``quant=gguf`` runs without ``lean_allocator``.

It is process-wide, so only ``lorakit train`` with ``quant=`` (the runs whose point is memory)
calls it; the benchmark applies it to every mode it compares.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3


SMALL_TENSORS = 128 << 10


def lean_allocator(mmap_threshold: int = 1 << 20, trim_threshold: int = 16 << 20) -> bool:
    """Fix glibc's mmap and trim thresholds (bytes). True if applied; False off glibc (macOS,
    Windows, musl), where nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1 and mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1
