"""NF4 and FP4 blockwise quantization of a weight tensor (QLoRA, Dettmers et al. 2023, §3).

    q = quantize(w, blocksize=64, double_quant=True, quant_type="nf4")
    q.packed          # ((n+1)//2, 1) uint8, bitsandbytes' layout (two codes per byte)
    q.absmax          # (⌈n/64⌉,) fp32, recovered from its 8-bit codes when double-quantized
    q.dequantize()    # w's shape and dtype: code · absmax in fp32, then cast
    q.bits_per_param  # 4.5 without double quantization, 4.127 with it (4096 × 4096, blocksize 64)

Bit-exact with ``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` (0.50.2, CPU) for the
packed bytes, the absmax values and the dequantized weights; see ``kernels4.py`` for the layout and
``codebooks.py`` for the tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import QuantizationError
from .blockwise8 import Blockwise8bit, DoubleQuantized
from .codebooks import check_quant_type
from .kernels4 import dequantize_flat, quantize_flat

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_blocksize(blocksize: int) -> int:
    if blocksize not in BLOCKSIZES or not isinstance(blocksize, int) or isinstance(blocksize, bool):  # 64.0 == 64
        raise QuantizationError(
            f"blocksize={blocksize!r} is not supported; use a power of two from 32 to 4096 "
            f"({', '.join(map(str, BLOCKSIZES))}). QLoRA uses 64."
        )
    return blocksize


def check_float_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise QuantizationError(
            f"{what} has dtype {dtype}; 4-bit quantization takes float32, bfloat16 or float16. "
            "Cast it first (e.g. w.to(torch.bfloat16))."
        )


@dataclass(frozen=True)
class Layout4bit:
    """Everything but the tensors: enough to rebuild a :class:`Quantized4bit` from its buffers."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    double_quant: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        if self.double_quant:
            return ("packed", "absmax_codes", "absmax_scale", "absmax_offset")
        return ("packed", "absmax")

    def build(self, tensors: dict[str, torch.Tensor]) -> Quantized4bit:
        if self.double_quant:
            q = Blockwise8bit(tensors["absmax_codes"], tensors["absmax_scale"], DoubleQuantized.BLOCKSIZE)
            stats = DoubleQuantized(q, tensors["absmax_offset"])
        else:
            stats = tensors["absmax"]
        return Quantized4bit(tensors["packed"], stats, self)


@dataclass(frozen=True, eq=False)
class Quantized4bit:
    """A 4-bit blockwise-quantized tensor: packed codes plus per-block absmax (or its 8-bit codes)."""

    packed: torch.Tensor  # ((n+1)//2, 1) uint8
    stats: torch.Tensor | DoubleQuantized  # (blocks,) fp32 absmax, or its double quantization
    layout: Layout4bit

    shape = property(lambda self: torch.Size(self.layout.shape))
    dtype = property(lambda self: self.layout.dtype)
    blocksize = property(lambda self: self.layout.blocksize)
    quant_type = property(lambda self: self.layout.quant_type)
    double_quant = property(lambda self: self.layout.double_quant)

    @property
    def absmax(self) -> torch.Tensor:
        """Per-block absmax, (⌈n/blocksize⌉,) fp32 (recovered from 8 bits if double-quantized)."""
        return self.stats.dequantize() if isinstance(self.stats, DoubleQuantized) else self.stats

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor back in its shape: ``code · absmax`` in fp32, cast once to ``dtype``
        (default: the original dtype)."""
        lay = self.layout
        flat = dequantize_flat(self.packed.view(-1), self.absmax, lay.numel, lay.blocksize, lay.quant_type,
                               dtype or lay.dtype)
        return flat.view(lay.shape)

    @property
    def nbytes(self) -> int:
        stats = self.stats.nbytes if isinstance(self.stats, DoubleQuantized) else 4 * self.stats.numel()
        return self.packed.numel() + stats

    @property
    def bits_per_param(self) -> float:
        """Storage bits per element: codes, padding nibble and all statistics counted."""
        return 8 * self.nbytes / self.layout.numel

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (the inverse of :meth:`Layout4bit.build`)."""
        if isinstance(self.stats, DoubleQuantized):
            return {"packed": self.packed, "absmax_codes": self.stats.q.codes,
                    "absmax_scale": self.stats.q.absmax, "absmax_offset": self.stats.offset}
        return {"packed": self.packed, "absmax": self.stats}

    def to(self, device: torch.device | str) -> Quantized4bit:
        return Quantized4bit(self.packed.to(device), self.stats.to(device), self.layout)


def quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
             quant_type: str = "nf4") -> Quantized4bit:
    """Quantize ``w`` (any shape; fp32/bf16/fp16) blockwise to NF4 or FP4 (QLoRA §3).

    ``double_quant`` also quantizes the absmax values (QLoRA §3, "Double Quantization"): 8-bit
    dynamic-map codes of absmax − mean in blocks of 256.
    """
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    if not isinstance(w, torch.Tensor):
        raise QuantizationError(f"quantize expects a torch.Tensor, got {type(w).__name__}.")
    check_float_dtype(w.dtype, "the tensor to quantize")
    if w.numel() == 0:
        raise QuantizationError(f"cannot quantize an empty tensor (shape {tuple(w.shape)}).")
    flat = w.detach().contiguous().view(-1)
    packed, absmax = quantize_flat(flat, blocksize, quant_type)
    bad = (~torch.isfinite(absmax)).nonzero()
    if bad.numel():
        b = int(bad[0])
        raise QuantizationError(
            f"the tensor (shape {tuple(w.shape)}) has inf/NaN values in {bad.numel()} block(s), the first "
            f"covering flat elements {b * blocksize}…{min((b + 1) * blocksize, w.numel()) - 1}; "
            "quantization needs finite weights — check the checkpoint or the training run that wrote it."
        )
    stats = DoubleQuantized.quantize(absmax) if double_quant else absmax
    layout = Layout4bit(tuple(w.shape), w.dtype, blocksize, quant_type, bool(double_quant))
    return Quantized4bit(packed.view(-1, 1), stats, layout)
