"""int8 per-output-channel quantization: symmetric (absmax) or asymmetric (scale + zero point).

One scale per row (output channel) of a weight viewed as (rows, -1):

    symmetric:   s = absmax / 127          q = clamp(round(x / s), -127, 127)   (int8)   x ≈ q · s
    asymmetric:  s = (max - min) / 255     z = round(-min / s)
                 q = clamp(round(x / s) + z, 0, 255)                          (uint8)  x ≈ (q - z) · s

Rounding order, pinned: s in fp32, then x / s in fp32 (a true division, not x · (1/s)), then
``torch.round``, which rounds half to even (2.5 → 2, 3.5 → 4, −0.5 → −0), then the clamp. The
symmetric range stops at −127 so that the grid is symmetric around 0.

Degenerate rows never divide by zero: an all-zero row uses s = 1 (all codes 0); an asymmetric
constant row (max == min == c ≠ 0) uses s = |c|, so z = −sign(c) and q = 0 dequantize to c exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import QuantizationError
from .nf4 import check_float_dtype


@dataclass(frozen=True)
class LayoutInt8:
    shape: tuple[int, ...]
    dtype: torch.dtype
    symmetric: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def quant_type(self) -> str:
        return "int8" if self.symmetric else "int8_asym"

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return ("q", "scale") if self.symmetric else ("q", "scale", "zero_point")

    def build(self, tensors: dict[str, torch.Tensor]) -> QuantizedInt8:
        return QuantizedInt8(tensors["q"], tensors["scale"], tensors.get("zero_point"), self)


@dataclass(frozen=True, eq=False)
class QuantizedInt8:
    q: torch.Tensor  # (rows, cols) int8 (symmetric) or uint8 (asymmetric)
    scale: torch.Tensor  # (rows,) fp32
    zero_point: torch.Tensor | None  # (rows,) int32, asymmetric only
    layout: LayoutInt8

    shape = property(lambda self: torch.Size(self.layout.shape))
    dtype = property(lambda self: self.layout.dtype)
    quant_type = property(lambda self: self.layout.quant_type)

    @property
    def device(self) -> torch.device:
        return self.q.device

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``q · s`` (or ``(q − z) · s``) in fp32, cast to ``dtype`` (default: the original dtype)."""
        q = self.q.float()  # (rows, cols); |q - z| ≤ 255 + |z| is exact in fp32
        if self.zero_point is not None:
            q = q - self.zero_point.float().unsqueeze(1)
        return (q * self.scale.unsqueeze(1)).to(dtype or self.layout.dtype).view(self.layout.shape)

    @property
    def nbytes(self) -> int:
        zp = 4 * self.zero_point.numel() if self.zero_point is not None else 0
        return self.q.numel() + 4 * self.scale.numel() + zp

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.layout.numel

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"q": self.q, "scale": self.scale}
        if self.zero_point is not None:
            out["zero_point"] = self.zero_point
        return out

    def to(self, device: torch.device | str) -> QuantizedInt8:
        zp = self.zero_point.to(device) if self.zero_point is not None else None
        return QuantizedInt8(self.q.to(device), self.scale.to(device), zp, self.layout)


def quantize(w: torch.Tensor, symmetric: bool = True) -> QuantizedInt8:
    """Quantize ``w`` (rows = dim 0 = output channels) to int8 with one scale per row."""
    if not isinstance(w, torch.Tensor) or w.dim() < 1 or w.numel() == 0:
        raise QuantizationError(
            f"int8 quantization needs a non-empty tensor with at least one dimension, got "
            f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}."
        )
    check_float_dtype(w.dtype, "the tensor to quantize")
    x = w.detach().reshape(w.shape[0], -1).float()  # (rows, cols)
    if not torch.isfinite(x).all():
        row = int((~torch.isfinite(x)).any(dim=1).nonzero()[0])
        raise QuantizationError(f"row {row} of the tensor (shape {tuple(w.shape)}) has inf/NaN; "
                                "quantization needs finite weights.")
    layout = LayoutInt8(tuple(w.shape), w.dtype, bool(symmetric))
    if symmetric:
        absmax = x.abs().amax(dim=1)  # (rows,)
        scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
        q = torch.round(x / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
        return QuantizedInt8(q, scale, None, layout)
    lo, hi = x.amin(dim=1), x.amax(dim=1)  # (rows,)
    span = (hi - lo) / 255.0
    constant = hi == lo
    scale = torch.where(constant, torch.where(lo != 0, lo.abs(), torch.ones_like(lo)), span)
    zero_point = torch.round(-lo / scale)  # (rows,), exact integers in fp32
    q = (torch.round(x / scale.unsqueeze(1)) + zero_point.unsqueeze(1)).clamp_(0, 255).to(torch.uint8)
    return QuantizedInt8(q, scale, zero_point.to(torch.int32), layout)
