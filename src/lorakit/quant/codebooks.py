"""The code books: the 16 values of NF4 and FP4 and the 256 values of the 8-bit dynamic map.

A 4-bit code is an index into a 16-entry table of values in [-1, 1]; a block of weights is stored as
codes plus the block's absmax, and dequantizes to ``table[code] · absmax`` (Dettmers et al. 2023,
QLoRA §3, "4-bit NormalFloat Quantization" and "Block-wise k-bit Quantization").

The tables are written out literally, as bitsandbytes ships them, because lorakit is bit-exact with
bitsandbytes. Regenerating NF4 from normal quantiles (QLoRA eq. 4) differs in the last bits (~1e-7),
which flips the rounding of values that sit on a midpoint.
"""

from __future__ import annotations

import functools

import torch

from ..errors import QuantizationError

QUANT_TYPES_4BIT = ("nf4", "fp4")

#: NF4 (QLoRA §3, Appendix E): quantiles of N(0, 1) normalised to [-1, 1], with an exact 0.
#: Sorted ascending, so code = position in sorted order.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

#: FP4 (E2M1 with bitsandbytes' exponent bias), in bit-pattern order: code = sign·8 + e1 e0 m.
#: Times 12 the magnitudes are 0, 1/16, 8, 12, 4, 6, 2, 3; the values are those divided by 12 in
#: fp32 (written as the exact fp32 values). Code 8 (sign bit on zero) is a second +0.0, not −0.0:
#: bitsandbytes' table holds +0.0 there, and a −0.0 would flip the sign bit of dequantized zeros.
FP4_CODE = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0,
    0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
    -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)

#: Code at each sorted position of FP4. The two zeros tie; bitsandbytes' sort puts code 0 before
#: code 8, so a scaled value in (−0.0026, 0] gets code 0 and one in (0, 0.0026] code 8. Both
#: dequantize to +0; the order only matters for byte parity.
FP4_SORTED_CODES = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)


def check_quant_type(quant_type: str) -> str:
    if quant_type not in QUANT_TYPES_4BIT:
        raise QuantizationError(
            f"quant_type={quant_type!r} is not a 4-bit format; use 'nf4' (normal weights, QLoRA's "
            "default) or 'fp4'."
        )
    return quant_type


@functools.cache
def code_table(quant_type: str) -> torch.Tensor:
    """(16,) fp32 values indexed by code, on the CPU."""
    table = NF4_CODE if check_quant_type(quant_type) == "nf4" else FP4_CODE
    return torch.tensor(table, dtype=torch.float32)


@functools.cache
def sorted_codes(quant_type: str) -> tuple[int, ...]:
    """The code at each position of the table sorted by value (ties in bitsandbytes' order)."""
    return tuple(range(16)) if check_quant_type(quant_type) == "nf4" else FP4_SORTED_CODES


@functools.cache
def midpoints(quant_type: str) -> tuple[float, ...]:
    """The 15 decision boundaries: means of neighbours in sorted order, computed in fp32.

    Rounding a scaled value x to the nearest code with ties going to the lower value is then
    "sorted position = number of boundaries strictly below x".
    """
    values = code_table(quant_type)[list(sorted_codes(quant_type))]
    return tuple(((values[:-1] + values[1:]) / 2).tolist())


def max_half_gap(quant_type: str) -> float:
    """Half the largest gap between neighbouring values: the worst rounding error of a scaled value."""
    values = code_table(quant_type).sort().values
    return float((values[1:] - values[:-1]).max()) / 2


@functools.cache
def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 8-bit dynamic map (Dettmers 2016, "8-Bit Approximations"; bitsandbytes'
    ``create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``), sorted, (256,) fp32.

    The value range is split into decades 10^(k-6), k = 0 … 6. Decade k carries 2^k (signed) or
    2^(k+1) (unsigned) linear fraction steps: the midpoints of ``linspace(0.1, 1, steps + 1)``,
    scaled by 10^(k-6) (both computed in fp32). Small magnitudes get few codes and large ones many,
    which suits Adam's moments and absmax offsets. Add 0 and 1 and that is 256 values; the
    signed map has no −1 (its most negative value is ≈ −0.9930).
    """
    values = [0.0, 1.0]
    for k in range(7):
        steps = 2**k if signed else 2 ** (k + 1)
        edges = torch.linspace(0.1, 1.0, steps + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        decade = (10.0 ** (k - 6)) * means  # fp32 product, as the reference computes it
        values += decade.tolist()
        if signed:
            values += (-decade).tolist()
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)
