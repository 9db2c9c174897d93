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


def _halves(b: torch.Tensor, *index: int) -> list[torch.Tensor]:
    """The f16 fields at half-word ``index`` of each block (b: (n, type_size) contiguous, type_size
    even) as (n, 1) fp32 — a view of the bytes, no copy of the codes."""
    h = b.view(torch.float16)  # (n, type_size / 2)
    return [h[:, i:i + 1].to(torch.float32) for i in index]


def _unpack_nibbles(b: torch.Tensor, start: int, k: int, out: torch.Tensor) -> torch.Tensor:
    """Bytes ``b[:, start:]`` of each block ((n, type_size) contiguous), as k runs of m bytes -> out
    (n, k, 2, m) fp32 codes: per run the low nibbles, then the high nibbles. The nibble ops run on the
    contiguous blocks and the codes are gathered as uint8 (strided ops are several times slower), so
    the one uint8 → fp32 conversion is a contiguous ``copy_`` into ``out``."""
    n = b.shape[0]
    lo = (b & 0x0F)[:, start:].view(n, k, 1, -1)
    hi = (b >> 4)[:, start:].view(n, k, 1, -1)
    return out.copy_(torch.cat([lo, hi], dim=2))


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    (d,) = _halves(b, 0)
    n = b.shape[0]
    q = _unpack_nibbles(b, 2, 1, out.view(n, 1, 2, 16)).view(n, 32)
    return q.sub_(8.0).mul_(d)  # d · (q − 8); q − 8 is exact in fp32


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    d, m = _halves(b, 0, 1)
    n = b.shape[0]
    q = _unpack_nibbles(b, 4, 1, out.view(n, 1, 2, 16)).view(n, 32)
    return q.mul_(d).add_(m)  # (d·q) + m: two roundings, as numpy does (no fused multiply-add)


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    (d,) = _halves(b, 0)
    return out.copy_(b[:, 2:].view(torch.int8)).mul_(d)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4)."""
    n = s.shape[0]
    s = s.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn  # (n, 8) each


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _halves(b, 0, 1)
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    q = _unpack_nibbles(b, 16, 4, out.view(n, 4, 2, 32)).view(n, 8, 32)
    return q.mul_(d).sub_(dm).view(n, 256)  # (d·sc)·q − dmin·m


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh, scales = b[:, :128], b[:, 128:192], b[:, 192:208]
    (d,) = _halves(b, 104)
    d = (d * scales.view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    lo = torch.cat([ql.reshape(n, 2, 1, 64) & 0x0F, ql.reshape(n, 2, 1, 64) >> 4], dim=2).reshape(n, 8, 32)
    qh = qh.reshape(n, -1, 1, 32)
    hi = torch.cat([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], dim=2).reshape(n, 8, 32)
    q = out.view(n, 8, 32).copy_(lo | (hi << 4)).sub_(32.0)  # q − 32 is exact in fp32
    return q.view(n, 16, 16).mul_(d).view(n, 256)  # (d·sc)·(q − 32)


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
               chunk_rows: int = 4096, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed rows (rows, row_bytes) uint8 -> weights (rows, cols) in ``dtype`` (computed in fp32, one
    cast at the end). Works in chunks of rows so the fp32 temporaries stay small for a bf16 result.
    ``out``: a contiguous (rows, cols) tensor of ``dtype`` to write into (a reused buffer)."""
    fmt = check_format(qtype)
    rows, cols = shape
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, fmt.row_bytes(cols)):
        raise QuantizationError(
            f"{qtype} data of shape {tuple(packed.shape)} {packed.dtype} does not hold a ({rows}, {cols}) tensor "
            f"(expected ({rows}, {fmt.row_bytes(cols)}) uint8)."
        )
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype, device=packed.device)
    fn = _DEQUANT[qtype]
    packed = packed.contiguous()  # the f16 fields are read as a view of whole blocks
    tmp = None
    for r0 in range(0, rows, chunk_rows):
        part = packed[r0:r0 + chunk_rows]
        blocks = part.reshape(-1, fmt.type_size)  # (n blocks, type_size)
        dst = out[r0:r0 + chunk_rows]
        if dtype == torch.float32:  # decode straight into the result
            fn(blocks, dst.view(-1, fmt.block_size))
        else:  # decode in fp32, then one cast
            if tmp is None:
                tmp = torch.empty(min(rows, chunk_rows) * cols, dtype=torch.float32, device=packed.device)
            n = blocks.shape[0] * fmt.block_size
            dst.copy_(fn(blocks, tmp[:n].view(-1, fmt.block_size)).view(dst.shape))
    return out
