"""GGUF (llama.cpp / ggml) block formats: dequantize packed blocks with torch, bit-exact with
``gguf.quants.dequantize``.

A quantized GGUF tensor of shape (rows, cols) is ``rows × cols / block_size`` blocks stored row-major,
each ``type_size`` bytes; a row is a whole number of blocks, so rows are independent (a row
permutation of the bytes is a row permutation of the weights). Per format (ggml-common.h):

    Q4_0  32 weights, 18 B: d f16 | 16 B nibbles          w = d · (q − 8)
    Q4_1  32 weights, 20 B: d f16 | m f16 | 16 B nibbles  w = d · q + m
    Q8_0  32 weights, 34 B: d f16 | 32 × int8             w = q · d
    Q4_K 256 weights, 144 B: d f16 | dmin f16 | 12 B of 6-bit (scale, min) × 8 | 128 B nibbles
                                                        w = (d · sc_j) · q − dmin · m_j  (j: 32-weight group)
    Q6_K 256 weights, 210 B: 128 B low nibbles | 64 B high 2-bit pairs | 16 × int8 scales | d f16
                                                        w = (d · sc_j) · (q − 32)         (j: 16-weight group)

Nibble order (Q4_*): byte i of a 32-weight run holds weight i in its low nibble and weight i + 16
(i + 32 for K-quants' 64-weight runs) in its high nibble. Every product is an fp32 multiply done
in the same order as gguf's numpy code (no fused multiply-add), so the results are bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import QuantizationError


@dataclass(frozen=True)
class BlockFormat:
    name: str
    block_size: int  # weights per block
    type_size: int  # bytes per block

    def row_bytes(self, cols: int) -> int:
        return cols // self.block_size * self.type_size


FORMATS = {f.name: f for f in (
    BlockFormat("Q4_0", 32, 18),
    BlockFormat("Q4_1", 32, 20),
    BlockFormat("Q8_0", 32, 34),
    BlockFormat("Q4_K", 256, 144),
    BlockFormat("Q6_K", 256, 210),
)}
DENSE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 little-endian halves -> (n, 1) fp32."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor, run: int) -> torch.Tensor:
    """(n, k·run/2) bytes -> (n, k·run) codes: each run/2 bytes give `run` codes, low nibbles first."""
    n = qs.shape[0]
    qs = qs.reshape(n, -1, 1, run // 2)
    lo_hi = torch.cat([qs & 0x0F, qs >> 4], dim=2)  # (n, k, 2, run/2)
    return lo_hi.reshape(n, -1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], 32).to(torch.int8) - 8
    return d * q.to(torch.float32)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:], 32).to(torch.float32)
    return d * q + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = b[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return q * d


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4)."""
    n = s.shape[0]
    s = s.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn  # (n, 8) each


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 64).to(torch.float32).reshape(n, 8, 32)
    return (d * q - dm).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], b[:, 208:210]
    d = (_f16(d) * scales.contiguous().view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    lo = _nibbles(ql, 128).reshape(n, -1, 32)  # (n, 8, 32)
    qh = qh.reshape(n, -1, 1, 32)
    hi = torch.cat([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], dim=2).reshape(n, -1, 32)  # (n, 8, 32)
    q = (lo | (hi << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, 16, 16).to(torch.float32)).reshape(n, 256)


_DEQUANT = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q6_K": _q6_k}


def check_format(qtype: str, what: str = "tensor") -> BlockFormat:
    fmt = FORMATS.get(qtype)
    if fmt is None:
        raise QuantizationError(
            f"{what}: GGUF tensor type {qtype} is not supported by lorakit's packed GGUF base (supported: "
            f"{', '.join(FORMATS)}, and dense {', '.join(DENSE)}). Re-quantize the file with llama.cpp's "
            "llama-quantize to one of these (e.g. Q4_K_M or Q8_0), or load it dequantized with transformers "
            "(from_pretrained(dir, gguf_file=...))."
        )
    return fmt


def dequantize(qtype: str, packed: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.float32,
               chunk_rows: int = 4096) -> torch.Tensor:
    """Packed rows (rows, row_bytes) uint8 -> weights (rows, cols) in ``dtype`` (computed in fp32, one
    cast at the end). Works in chunks of rows so the fp32 temporaries stay small for a bf16 result."""
    fmt = check_format(qtype)
    rows, cols = shape
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, fmt.row_bytes(cols)):
        raise QuantizationError(
            f"{qtype} data of shape {tuple(packed.shape)} {packed.dtype} does not hold a ({rows}, {cols}) tensor "
            f"(expected ({rows}, {fmt.row_bytes(cols)}) uint8)."
        )
    out = torch.empty(rows, cols, dtype=dtype, device=packed.device)
    fn = _DEQUANT[qtype]
    for r0 in range(0, rows, chunk_rows):
        part = packed[r0:r0 + chunk_rows]
        blocks = part.reshape(-1, fmt.type_size)
        out[r0:r0 + chunk_rows] = fn(blocks).reshape(part.shape[0], cols).to(dtype)
    return out
