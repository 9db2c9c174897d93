"""GGUF-quantized weights as a ``QuantLinear`` format: the llama.cpp blocks stay packed in memory
(Q4_1 ≈ 5 bits per weight) and are dequantized on every use, bit-exact with ``gguf``.

``GGUFWeight`` offers what ``QuantLinear`` asks of a quantized weight (``layout``, ``tensors()``,
``dequantize(dtype)``, ``bits_per_param``), so a GGUF base is the same frozen base kind as NF4 —
same memory-saving autograd function (only the packed bytes are saved for backward), same LoRA
kind, same dequantizing merge — and no LoRA code knows about GGUF.

    packed: (out, out-row bytes) uint8, rows in transformers' order (Llama's q/k row permutation is
            undone on load by reordering whole rows of blocks, which is exact)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import QuantizationError
from .gguf_codecs import FORMATS, check_format, dequantize
from .gguf_matmul import GGUFDequantLinear
from .gguf_matmul import row_tiles as gguf_row_tiles
from .keep_dtype import apply_keeping_dtype
from .linear import QuantLinear, check_compute_dtype


@dataclass(frozen=True)
class GGUFLayout:
    """What a GGUF weight keeps besides its bytes: the (out, in) shape, the block format and the
    dtype dequantization returns by default."""

    shape: tuple[int, int]
    quant_type: str  # "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"
    dtype: torch.dtype = torch.float32
    tensor_names: tuple[str, ...] = ("packed",)
    double_quant: bool = False  # QuantLinear's repr / requantized merge read it
    # QuantLinear's matmul for this format (a class attribute, not a field): slab-wise dequantization,
    # so no whole dense W exists in forward or backward (gguf_matmul.py).
    linear_fn = GGUFDequantLinear

    def row_tiles(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, rows: int):
        """W's rows dequantized ``rows`` at a time (QuantLinear.weight_tiles; rows are whole blocks)."""
        return gguf_row_tiles(self, tensors["packed"], dtype, rows)

    def build(self, tensors: dict[str, torch.Tensor]) -> GGUFWeight:
        return GGUFWeight(tensors["packed"], self)


class GGUFWeight:
    """A (out, in) weight held as GGUF blocks."""

    def __init__(self, packed: torch.Tensor, layout: GGUFLayout):
        fmt = check_format(layout.quant_type)
        rows, cols = layout.shape
        if cols % fmt.block_size:
            raise QuantizationError(
                f"a {layout.quant_type} weight needs rows of a multiple of {fmt.block_size} weights; got shape {layout.shape}."
            )
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, fmt.row_bytes(cols)):
            raise QuantizationError(
                f"{layout.quant_type} bytes of shape {tuple(packed.shape)} ({packed.dtype}) do not hold a {layout.shape} "
                f"weight; expected ({rows}, {fmt.row_bytes(cols)}) uint8."
            )
        self.packed, self.layout = packed, layout

    @property
    def shape(self) -> tuple[int, int]:
        return self.layout.shape

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.layout.quant_type, self.packed, self.layout.shape, dtype or self.layout.dtype)

    @property
    def bits_per_param(self) -> float:
        fmt = FORMATS[self.layout.quant_type]
        return 8 * fmt.type_size / fmt.block_size


def gguf_linear(packed: torch.Tensor, quant_type: str, shape: tuple[int, int], bias: torch.Tensor | None = None,
                compute_dtype: torch.dtype = torch.float32, dtype: torch.dtype = torch.float32) -> QuantLinear:
    """A frozen ``QuantLinear`` over GGUF blocks. ``dtype``: what ``dequantize()`` returns by default
    (the dtype a dequantizing merge writes); ``compute_dtype``: the forward's matmul dtype."""
    check_compute_dtype(compute_dtype)
    weight = GGUFWeight(packed, GGUFLayout(tuple(shape), quant_type, dtype))
    return QuantLinear(weight, bias, compute_dtype)


class GGUFEmbedding(nn.Module):
    """A frozen embedding table held as GGUF blocks: a lookup dequantizes only the rows it reads
    (ids (...,) -> (..., dim)); ``dequantize_weight()`` gives the whole (vocab, dim) table."""

    def __init__(self, weight: GGUFWeight, padding_idx: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.layout, self.padding_idx, self.dtype_out = weight.layout, padding_idx, dtype
        self.register_buffer("weight_packed", weight.packed)
        self.weight_packed._lorakit_params = self.num_embeddings * self.embedding_dim

    @property
    def qweight(self) -> GGUFWeight:
        return GGUFWeight(self.weight_packed, self.layout)

    def dequantize_weight(self) -> torch.Tensor:
        return self.qweight.dequantize(self.dtype_out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        rows = dequantize(self.layout.quant_type, self.weight_packed[uniq], (len(uniq), self.embedding_dim), self.dtype_out)
        return rows[inverse].reshape(*ids.shape, self.embedding_dim)

    def _apply(self, fn, recurse=True):
        # .to(dtype) must not cast the codes; only their device may change (as QuantLinear does).
        apply_keeping_dtype(self, ["weight_packed"], fn, lambda: super(GGUFEmbedding, self)._apply(fn, recurse))
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.layout.quant_type}"
