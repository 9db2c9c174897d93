"""Blockwise 8-bit quantization with the dynamic map: for absmax double quantization and Adam's state.

    x (n,) fp32 → blocks of ``blocksize`` → absmax_b = max |x| in block b
               → code_i = nearest value of the dynamic map to x_i / absmax_b (ties to the lower value)
    dequantize: map[code_i] · absmax_b

Rounding choice: bitsandbytes rounds these 8-bit codes differently on its CPU (C kernel) and CUDA
paths, so there is no single reference to be bit-exact with. lorakit takes the exact nearest code,
ties to the lower value — the same rule as its 4-bit formats, and what bitsandbytes' pure-PyTorch
backend does. Scaling multiplies by 1/absmax; an all-zero block stores absmax 0 and dequantizes to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import ckernel
from .codebooks import dynamic_map

_TABLES: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}  # a cache torch.compile reads as constants


def _map_and_bounds(signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # Not functools.cache: torch.compile traces through that wrapper into dynamic_map (.tolist()), while
    # it reads a filled dict's tensors as constants (quantizing, always eager, fills it first).
    hit = _TABLES.get(signed)
    if hit is None:
        values = dynamic_map(signed)
        hit = _TABLES[signed] = (values, (values[:-1] + values[1:]) / 2)  # (256,), (255,) fp32, ascending
    return hit


@dataclass(frozen=True, eq=False)
class Blockwise8bit:
    """Codes (n,) uint8 and per-block absmax (⌈n/blocksize⌉,) fp32 of a flat fp32 tensor."""

    codes: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    signed: bool = True

    def dequantize(self) -> torch.Tensor:
        """(n,) fp32."""
        values, _ = _map_and_bounds(self.signed)
        if self.codes.device.type == "cpu" and not torch.compiler.is_compiling():
            vals = ckernel.dequant8(self.codes.reshape(-1), self.absmax, self.blocksize, self.signed)
            return vals if vals is not None else torch.from_numpy(self._dequantize_numpy(values.numpy()))
        vals = values.to(self.codes.device)[self.codes.long()]  # (n,)
        return _per_block(vals, self.blocksize, lambda v: v.mul_(self.absmax.view(-1, 1)))

    def _dequantize_numpy(self, values: np.ndarray) -> np.ndarray:
        """The CPU path (the 4-bit matmul decodes its absmax this way on every call): the same fp32
        products as the torch path, ~3x faster on small tensors. The codes are widened to intp first:
        np.take converts uint8 indices element by element."""
        vals = np.take(values, self.codes.numpy().astype(np.intp), mode="clip")  # (n,) fp32
        absmax, bs = self.absmax.numpy(), self.blocksize
        full = vals.size - vals.size % bs
        body = vals[:full].reshape(-1, bs)
        np.multiply(body, absmax[: full // bs, None], out=body)
        if full < vals.size:  # a short last block
            np.multiply(vals[full:], absmax[-1], out=vals[full:])
        return vals

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.absmax.numel()

    def to(self, device: torch.device | str) -> Blockwise8bit:
        return Blockwise8bit(self.codes.to(device), self.absmax.to(device), self.blocksize, self.signed)


def quantize_blockwise8(x: torch.Tensor, blocksize: int = 256, signed: bool = True) -> Blockwise8bit:
    """Quantize a flat fp32 tensor (any values; unsigned maps expect x ≥ 0)."""
    x = x.detach().reshape(-1).float()
    values, bounds = _map_and_bounds(signed)
    nblocks = -(-x.numel() // blocksize)
    padded = torch.nn.functional.pad(x, (0, nblocks * blocksize - x.numel())).view(nblocks, blocksize)
    absmax = padded.abs().amax(dim=1)  # (blocks,)
    scaled = padded * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)
    scaled = scaled.view(-1)[: x.numel()]
    # index = number of bounds strictly below x, i.e. ties go to the lower value
    if x.device.type == "cpu":  # numpy's binary search is ~10x faster than torch.bucketize on the CPU
        codes = torch.from_numpy(np.searchsorted(bounds.numpy(), scaled.numpy(), side="left").astype(np.uint8))
    else:
        codes = torch.bucketize(scaled, bounds.to(x.device), right=False).to(torch.uint8)
    return Blockwise8bit(codes, absmax, blocksize, signed)


def _per_block(vals: torch.Tensor, blocksize: int, op) -> torch.Tensor:
    """Apply ``op`` to vals viewed as (blocks, blocksize), padding a short last block."""
    n = vals.numel()
    nblocks = -(-n // blocksize)
    if n == nblocks * blocksize:
        return op(vals.view(nblocks, blocksize)).view(n)
    padded = torch.nn.functional.pad(vals, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    return op(padded).view(-1)[:n]


@dataclass(frozen=True, eq=False)
class DoubleQuantized:
    """Absmax values stored as 8-bit codes of (absmax − mean) plus the mean (QLoRA §3, "Double
    Quantization"): 8 bits + 32/256 bits per block instead of 32, i.e. 0.127 instead of 0.5 bits per
    weight at blocksize 64."""

    q: Blockwise8bit
    offset: torch.Tensor  # () fp32: the mean of the absmax values

    BLOCKSIZE = 256  # QLoRA's second-level blocksize

    @classmethod
    def quantize(cls, absmax: torch.Tensor) -> DoubleQuantized:
        # Centering on the mean uses the signed map's both halves (absmax values are all > 0).
        offset = absmax.mean()
        return cls(quantize_blockwise8(absmax - offset, cls.BLOCKSIZE, signed=True), offset)

    def dequantize(self) -> torch.Tensor:
        """The recovered absmax values, (blocks,) fp32."""
        vals = self.q.dequantize()
        if vals.device.type == "cpu" and not torch.compiler.is_compiling():  # in place: a fresh (blocks,) result
            return vals.add_(self.offset)
        return vals + self.offset

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + 4

    def to(self, device: torch.device | str) -> DoubleQuantized:
        return DoubleQuantized(self.q.to(device), self.offset.to(device))
