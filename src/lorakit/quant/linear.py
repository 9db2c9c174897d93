"""``QuantLinear``: a frozen linear layer whose weight exists only in quantized form.

    y = x Wᵀ + b      W = dequantize(packed codes, statistics)   (out, in), rebuilt on every use

The module holds the quantized tensors as buffers (so ``state_dict`` and ``.to(device)`` carry
them) and no floating-point weight. The matmul runs through an autograd function that saves only
the quantized tensors and dequantizes W again in backward for the input gradient (there is no
weight gradient: W is frozen). So no full-precision copy of W lives across the training step —
QLoRA's memory trick (Dettmers et al. 2023, §3, eq. 5-6), as torchao's ``LinearNF4`` does it.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QuantizationError
from . import autograd4, int8, nf4
from .autograd4 import TiledDequantLinear4
from .keep_dtype import apply_keeping_dtype
from .lora_kind import QuantLinearKind

COMPUTE_DTYPES = (torch.bfloat16, torch.float32, torch.float16)
QUANT_TYPES = ("nf4", "fp4", "int8", "int8_asym")


class Layout(Protocol):
    """What a quantized format keeps besides its tensors (``nf4.Layout4bit``, ``int8.LayoutInt8``)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    quant_type: str
    tensor_names: tuple[str, ...]

    def build(self, tensors: dict[str, torch.Tensor]): ...


class _DequantLinear(torch.autograd.Function):
    """``x Wᵀ`` with W rebuilt from its quantized tensors in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, layout, compute_dtype, *tensors):
        # x: (..., in) in compute_dtype; W: (out, in), freed when forward returns.
        w = layout.build(dict(zip(layout.tensor_names, tensors))).dequantize(compute_dtype)
        ctx.layout, ctx.compute_dtype, ctx.n_tensors = layout, compute_dtype, len(tensors)
        ctx.save_for_backward(*tensors)  # uint8 codes + small fp32 statistics only
        return F.linear(x, w)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            layout = ctx.layout
            w = layout.build(dict(zip(layout.tensor_names, ctx.saved_tensors))).dequantize(ctx.compute_dtype)
            grad_x = grad_out.to(w.dtype) @ w  # (..., out) @ (out, in) -> (..., in)
        return (grad_x, None, None) + (None,) * ctx.n_tensors


def quantize_weight(weight: torch.Tensor, quant_type: str, double_quant: bool = True, blocksize: int = 64):
    """Quantize a dense weight to ``quant_type`` (``nf4.Quantized4bit`` or ``int8.QuantizedInt8``)."""
    if quant_type in ("nf4", "fp4"):
        return nf4.quantize(weight, blocksize=blocksize, double_quant=double_quant, quant_type=quant_type)
    if quant_type in ("int8", "int8_asym"):
        return int8.quantize(weight, symmetric=quant_type == "int8")
    raise QuantizationError(
        f"quant_type={quant_type!r} is not supported; use one of {', '.join(map(repr, QUANT_TYPES))}."
    )


def check_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in COMPUTE_DTYPES:
        raise QuantizationError(
            f"compute_dtype={dtype} is not supported; use torch.bfloat16 (QLoRA's choice), torch.float32 "
            "or torch.float16."
        )
    return dtype


class QuantLinear(nn.Module):
    """Frozen ``nn.Linear`` replacement with an NF4 / FP4 / int8 weight. Build it with
    :meth:`from_linear`; see the module docstring for the memory behaviour."""

    #: how LoRA wraps this module (``lorakit.layers.kinds.kind_of`` reads it; no registration).
    lora_base_kind = QuantLinearKind()

    def __init__(self, qweight, bias: torch.Tensor | None, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if len(qweight.shape) != 2:
            raise QuantizationError(f"QuantLinear needs a 2-D (out, in) weight, got shape {tuple(qweight.shape)}.")
        self.out_features, self.in_features = qweight.shape
        self.layout: Layout = qweight.layout
        self.compute_dtype = check_compute_dtype(compute_dtype)
        for name, t in qweight.tensors().items():
            self.register_buffer("weight_" + name, t)
        self._tag_params()
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = True,
                    blocksize: int = 64, compute_dtype: torch.dtype = torch.bfloat16) -> QuantLinear:
        """Quantize ``linear``'s weight (its dtype is kept as the dequantization dtype).

        ``blocksize`` and ``double_quant`` describe the 4-bit formats; int8 has one fp32 scale per
        output row and ignores them.
        """
        if not isinstance(linear, nn.Linear):
            raise QuantizationError(f"from_linear expects an nn.Linear, got {type(linear).__name__}.")
        if linear.weight.device.type == "meta":
            raise QuantizationError("from_linear got a Linear on the meta device; load its weight first.")
        qweight = quantize_weight(linear.weight.detach(), quant_type, double_quant, blocksize)
        return cls(qweight, linear.bias, compute_dtype)

    # -- the quantized weight ------------------------------------------------------------------
    @property
    def quant_type(self) -> str:
        return self.layout.quant_type

    @property
    def qweight(self):
        """The quantized weight object (``nf4.Quantized4bit`` or ``int8.QuantizedInt8``) over the buffers."""
        return self.layout.build(self._tensors())

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, "weight_" + name) for name in self.layout.tensor_names}

    def dequantize_weight(self) -> torch.Tensor:
        """W as a dense (out_features, in_features) tensor in ``compute_dtype``."""
        return self.qweight.dequantize(self.compute_dtype)

    def matmul_scratch_bytes(self, device: torch.device | str = "cpu") -> int:
        """Bytes of dequantized weight alive during one matmul: a tile (values, int64 indices, fp32
        staging) on the tiled CPU path (``autograd4``), else the whole W in fp32 plus its cast."""
        elem = torch.empty(0, dtype=self.compute_dtype).element_size()
        if autograd4.applies(self.layout, torch.device(device)):
            n = autograd4.tile_rows(self.out_features, self.in_features, self.layout.blocksize, 0) * self.in_features
            return n * (elem + 4 + (0 if self.compute_dtype == torch.float32 else 4))
        return self.in_features * self.out_features * (4 + elem)

    @property
    def bits_per_param(self) -> float:
        return self.qweight.bits_per_param

    @property
    def weight_tiles(self):
        """``lorakit.losses``' frozen-head protocol: ``tiles(dtype, rows)`` → (v0, v1, W[v0:v1]) when the
        format decodes row ranges on their own (GGUF blocks), else None (the chunked CE then
        checkpoints this head's forward per chunk)."""
        row_tiles = getattr(self.layout, "row_tiles", None)
        if row_tiles is None:
            return None
        tensors = self._tensors()
        return lambda dtype, rows: row_tiles(tensors, dtype, rows)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = self._tensors()
        # A format may bring its own function with the same contract (GGUF: dequantizes by slabs of rows);
        # NF4/FP4 on the CPU dequantize and multiply tile by tile in cache (autograd4); else the whole W.
        fn = getattr(self.layout, "linear_fn", None) or (
            TiledDequantLinear4 if autograd4.applies(self.layout, x.device) else _DequantLinear)
        out = fn.apply(x.to(self.compute_dtype), self.layout, self.compute_dtype,
                       *(tensors[n] for n in self.layout.tensor_names))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype)

    # -- keep codes and statistics as they are under .half() / .to(dtype) ------------------------
    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) would cast the fp32 statistics; only let their device change.
        names = ["weight_" + n for n in self.layout.tensor_names]
        try:
            apply_keeping_dtype(self, names, fn, lambda: super(QuantLinear, self)._apply(fn, recurse))
        finally:
            self._tag_params()
        return self

    def _tag_params(self) -> None:
        # lorakit.trainable_parameters counts the weights a packed buffer stands for.
        for n in self.layout.tensor_names:
            t = getattr(self, "weight_" + n)
            t._lorakit_params = self.in_features * self.out_features if n in ("packed", "q") else 0

    def extra_repr(self) -> str:
        lay = self.layout
        fmt = lay.quant_type
        if fmt in ("nf4", "fp4"):
            fmt += f", blocksize={lay.blocksize}, double_quant={lay.double_quant}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{fmt}, compute_dtype={self.compute_dtype}")
