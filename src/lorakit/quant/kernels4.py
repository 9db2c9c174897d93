"""Blockwise 4-bit kernels on flat tensors: ``(n,) floats → (packed codes, absmax)`` and back.

Layout (bitsandbytes' ``quantize_4bit``, kept byte for byte):

* the tensor is flattened row-major and cut into blocks of ``blocksize`` elements; the last block
  may be shorter;
* absmax per block in fp32; a scaled value is ``x · (1 / absmax)``, except in a short last block,
  which divides ``x / absmax`` (bitsandbytes does both; the two can differ by one ulp);
* the code is the nearest table value, a tie going to the lower value;
* two codes per byte, element 2i in the high nibble and 2i+1 in the low one; an odd count is padded
  with the code of 0.0.
* dequantized value = ``table[code] · absmax`` in fp32, rounded once to the output dtype.

Whole blocks on the CPU go through ``kernels4_cpu`` (numpy, chunked, threaded); on other devices
through the torch ops below, which are also the reference the CPU path is tested against. The short
last block always takes the torch path (it is < blocksize elements).
"""

from __future__ import annotations

import functools
import sys

import torch

from . import kernels4_cpu
from .codebooks import code_table, midpoints, sorted_codes

_TINY = 1e-38  # absmax floor for the division (a block of zeros); as bitsandbytes


@functools.cache
def _steps(quant_type: str) -> tuple[int, tuple[float, ...], tuple[int, ...]]:
    """(first code, boundaries, code increments) for the running-sum rounding in ``_codes``."""
    order = sorted_codes(quant_type)
    steps = tuple((order[i + 1] - order[i]) % 256 for i in range(15))
    return order[0], midpoints(quant_type), steps


def _codes(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Nearest code of each scaled value, ties to the lower value. (m,) fp32 → (m,) uint8.

    Sorted position = number of boundaries strictly below x (bucketize's left rule); we count it
    with 15 vectorized comparisons (several times faster than ``torch.bucketize``). For FP4 the
    running sum adds, mod 256, the step from one sorted position's code to the next, so it lands on
    the code itself without a gather. Values beyond ±1 saturate to the end codes.
    """
    first, bounds, steps = _steps(quant_type)
    q = torch.full(scaled.shape, first, dtype=torch.uint8, device=scaled.device)
    above = torch.empty(scaled.shape, dtype=torch.bool, device=scaled.device)
    for bound, step in zip(bounds, steps):
        torch.gt(scaled, bound, out=above)
        q.add_(above, alpha=step)  # uint8 arithmetic wraps mod 256
    return q


def _pack(codes: torch.Tensor, out: torch.Tensor) -> None:
    """(2m,) uint8 codes → out (m,) bytes, even element in the high nibble."""
    torch.bitwise_or(codes[0::2] << 4, codes[1::2], out=out)


def _on_cpu(t: torch.Tensor) -> bool:
    # Under torch.compile the torch ops below are the path on every device (numpy breaks the graph).
    return t.device.type == "cpu" and sys.byteorder == "little" and not torch.compiler.is_compiling()


def quantize_flat(flat: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """flat: (n,) contiguous fp16/bf16/fp32. Returns packed ((n+1)//2,) uint8, absmax (⌈n/bs⌉,) fp32."""
    n = flat.numel()
    full = n - n % blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    if _on_cpu(flat):
        kernels4_cpu.quantize_blocks(flat, full, blocksize, quant_type, packed, absmax)
    else:
        quantize_torch(flat[:full], blocksize, quant_type, packed[: full // 2], absmax[: full // blocksize])
    if full < n:  # the short last block: divide, and store the floored absmax (bitsandbytes' rule)
        x = flat[full:].float()
        amax = x.abs().max().clamp(min=_TINY)
        absmax[-1] = amax
        scaled = x / amax
        if scaled.numel() % 2:
            scaled = torch.cat([scaled, scaled.new_zeros(1)])  # pad with the code of 0.0
        _pack(_codes(scaled, quant_type), packed[full // 2:])
    return packed, absmax


def quantize_torch(flat: torch.Tensor, blocksize: int, quant_type: str, packed: torch.Tensor,
                   absmax: torch.Tensor) -> None:
    """Whole blocks with torch ops (any device): flat (full,) → packed (full/2,), absmax (full/bs,)."""
    if flat.numel() == 0:
        return
    x = flat.view(-1, blocksize).float()  # (blocks, bs)
    amax = torch.amax(x.abs(), dim=1, out=absmax)
    scaled = x * (1.0 / amax.clamp(min=_TINY)).unsqueeze(1)
    _pack(_codes(scaled.view(-1), quant_type), packed)


@torch.compiler.assume_constant_result  # under torch.compile: a constant table, not traced
@functools.cache
def _pair_table(quant_type: str) -> torch.Tensor:
    """(256, 2) fp32: the two values a packed byte stands for (high nibble first)."""
    code = code_table(quant_type)
    byte = torch.arange(256)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous()


def dequantize_flat(packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int, quant_type: str,
                    dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_flat`: ``code · absmax`` in fp32, cast to ``dtype``. Returns (n,)."""
    out = torch.empty(n, dtype=dtype, device=packed.device)
    full = n - n % blocksize
    if _on_cpu(packed):
        kernels4_cpu.dequantize_blocks(packed, absmax, full, blocksize, quant_type, out)
    else:
        dequantize_torch(packed[: full // 2], absmax, full, blocksize, quant_type, out[:full])
    if full < n:  # the short last block
        out[full:] = dequantize_tail(packed, absmax, n, blocksize, quant_type)
    return out


def dequantize_tail(packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int,
                    quant_type: str) -> torch.Tensor:
    """The short last block (n % blocksize elements, > 0) as fp32: ``code · absmax[-1]``."""
    full = n - n % blocksize
    vals = _pair_table(quant_type).to(packed.device)[packed[full // 2:].long()].view(-1)[: n - full]
    return vals * absmax[-1]


def dequantize_torch(packed: torch.Tensor, absmax: torch.Tensor, full: int, blocksize: int, quant_type: str,
                     out: torch.Tensor) -> None:
    """Whole blocks with torch ops (any device): one gather of byte pairs, one multiply, one cast."""
    if full == 0:
        return
    vals = _pair_table(quant_type).to(packed.device)[packed[: full // 2].long()].view(-1, blocksize)
    vals.mul_(absmax[: full // blocksize, None])  # (blocks, bs) fp32
    out[:full].view(-1, blocksize).copy_(vals)
