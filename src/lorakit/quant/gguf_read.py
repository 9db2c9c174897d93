"""Reading GGUF checkpoints (llama.cpp's format) tensor by tensor, in transformers' names and layout.

    f = GGUFFile("SmolLM2-135M-Instruct.Q4_1.gguf")
    f.architecture                  # "llama" (general.architecture)
    f.hf_name("blk.0.attn_q.weight")    # "model.layers.0.self_attn.q_proj.weight"
    f.gguf_name("lm_head.weight")       # "output.weight"
    f.qtype("blk.0.attn_q.weight")      # "Q4_1" (or "F32", "F16", "BF16", ...)
    f.packed("blk.0.attn_q.weight")     # (out, row bytes) uint8, rows in transformers' order
    f.dense("blk.0.attn_norm.weight")   # a float tensor in transformers' layout (a copy)
    f.config(), f.tokenizer()           # through transformers' GGUF support (metadata only)

The facts (llama.cpp's convert_hf_to_gguf.py, gguf-py's tensor_mapping.py): GGUF lists shapes in
ggml order (innermost first), so a (out, in) weight reads as [in, out]; the data of a quantized
tensor is (out, row bytes). For the ``llama`` architecture (Llama, SmolLM2, Mistral) the converter
permutes the rows of q and k (per head: pairs (2i, 2i+1) ← (i, i + d/2), the interleaved rotary
layout llama.cpp uses), with n_head for q and n_head_kv for k; this module undoes it by reordering
whole rows, which is exact for the packed bytes. Qwen2/Qwen3 files are not permuted.

The file is memory-mapped; every tensor handed out is a copy, so closing the file frees the map.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import QuantizationError
from .gguf_codecs import DENSE, check_format, dequantize


@dataclass(frozen=True)
class ArchSpec:
    """A GGUF architecture lorakit reads and writes: its transformers model types and whether q/k rows
    are permuted in the file."""

    gguf_arch: str
    model_types: tuple[str, ...]
    permute_qk: bool


ARCHS = {a.gguf_arch: a for a in (
    ArchSpec("llama", ("llama", "mistral"), True),  # llama.cpp writes Mistral as "llama" too
    ArchSpec("qwen2", ("qwen2",), False),
    ArchSpec("qwen3", ("qwen3",), False),
)}

# GGUF block tensor → transformers module path (gguf-py tensor_mapping.py, Llama-style decoders).
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}
_TOP_INV = {v: k for k, v in _TOP.items()}
# Tensors llama.cpp may store that transformers computes from the config instead.
IGNORED = ("rope_freqs.weight",)


def arch_for_model_type(model_type: str) -> ArchSpec | None:
    return next((a for a in ARCHS.values() if model_type in a.model_types), None)


def supported_model_types() -> list[str]:
    return sorted({t for a in ARCHS.values() for t in a.model_types})


def hf_module_of(gguf_module: str) -> str | None:
    """``blk.3.attn_q`` → ``model.layers.3.self_attn.q_proj`` (None: no transformers counterpart)."""
    if gguf_module in _TOP:
        return _TOP[gguf_module]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", gguf_module)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}"
    return None


def gguf_module_of(hf_module: str) -> str | None:
    """``model.layers.3.self_attn.q_proj`` → ``blk.3.attn_q``; also accepts PEFT's
    ``base_model.model.`` prefix. None: the module has no GGUF tensor (e.g. a classifier head)."""
    hf_module = hf_module.removeprefix("base_model.model.")
    if hf_module in _TOP_INV:
        return _TOP_INV[hf_module]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_module)
    if m and m.group(2) in _BLOCK_INV:
        return f"blk.{m.group(1)}.{_BLOCK_INV[m.group(2)]}"
    return None


def _split(name: str) -> tuple[str, str]:
    module, _, attr = name.rpartition(".")
    return module, attr


def qk_row_order(rows: int, n_head: int) -> torch.Tensor:
    """Index ``p`` with ``gguf_rows = hf_rows[p]`` for llama.cpp's q/k permutation of ``rows`` rows in
    ``n_head`` heads: per head, (2, d/2) → (d/2, 2), i.e. the rotary halves become interleaved pairs."""
    if rows % (2 * n_head):
        raise QuantizationError(f"cannot undo llama.cpp's q/k permutation: {rows} rows are not 2 × {n_head} heads.")
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


class GGUFFile:
    """A GGUF checkpoint opened for reading (memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        if not isinstance(path, (str, os.PathLike)):
            raise QuantizationError(f"GGUF path {path!r}: must be a file path (str or Path), not a "
                                    f"{type(path).__name__}; pass the path of a .gguf file.")
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise QuantizationError(f"{self.path}: no such GGUF file; pass the path of a .gguf file.")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError, IndexError, KeyError) as e:
            raise QuantizationError(
                f"{self.path} is not a readable GGUF file ({e}); check that the download is complete "
                "(llama.cpp's .gguf format, version 2 or 3)."
            ) from e
        self._tensors = {t.name: t for t in self.reader.tensors}
        self.architecture = self.field("general.architecture")
        self.spec = ARCHS.get(self.architecture)

    # -- metadata ---------------------------------------------------------------------------------
    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def require_supported(self) -> ArchSpec:
        if self.spec is None:
            raise QuantizationError(
                f"{self.path}: GGUF architecture {self.architecture!r} is not supported by lorakit's GGUF reader "
                f"(supported: {', '.join(ARCHS)} — Llama, SmolLM2, Mistral, Qwen2, Qwen3). Load it dequantized "
                "with transformers if transformers supports it, or convert the original checkpoint instead."
            )
        return self.spec

    @property
    def n_head(self) -> int:
        return int(self.field(f"{self.architecture}.attention.head_count"))

    @property
    def n_head_kv(self) -> int:
        return int(self.field(f"{self.architecture}.attention.head_count_kv", self.n_head))

    def config(self):
        """The transformers config transformers derives from the file's metadata."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path.parent, gguf_file=self.path.name, local_files_only=True)
        except (ValueError, KeyError) as e:
            raise QuantizationError(
                f"{self.path}: transformers cannot build a model for GGUF architecture {self.architecture!r} ({e}). "
                f"lorakit reads {', '.join(ARCHS)} GGUF files; for another architecture start from the original "
                "transformers checkpoint."
            ) from e

    def tokenizer(self):
        """The tokenizer (with the chat template) stored in the file, as a transformers tokenizer."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name, local_files_only=True)
        except (ValueError, KeyError, NotImplementedError) as e:
            raise QuantizationError(
                f"{self.path}: transformers cannot build the tokenizer stored in this GGUF file ({e}); pass a "
                "tokenizer directory of the same model instead."
            ) from e

    # -- tensors ----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def qtype(self, name: str) -> str:
        return self._get(name).tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape in transformers' order, e.g. (out, in) for a weight."""
        return tuple(int(n) for n in reversed(self._get(name).shape.tolist()))

    def hf_name(self, name: str) -> str | None:
        module, attr = _split(name)
        hf = hf_module_of(module)
        return None if hf is None else f"{hf}.{attr}"

    def gguf_name(self, hf_name: str) -> str | None:
        module, attr = _split(hf_name.removeprefix("base_model.model."))
        g = gguf_module_of(module)
        return None if g is None else f"{g}.{attr}"

    def raw(self, name: str):
        """The reader's tensor record (``gguf.ReaderTensor``: type, ggml shape, memory-mapped ``data`` in
        the file's own layout), e.g. to copy a tensor's bytes unchanged into another file."""
        return self._get(name)

    def _get(self, name: str):
        t = self._tensors.get(name)
        if t is None:
            raise QuantizationError(f"{self.path} has no tensor {name!r}; it is incomplete or of another architecture.")
        return t

    def _row_order(self, name: str, rows: int) -> torch.Tensor | None:
        if self.spec is None or not self.spec.permute_qk:
            return None
        module, _ = _split(name)
        if module.endswith(".attn_q"):
            return torch.argsort(qk_row_order(rows, self.n_head))
        if module.endswith(".attn_k"):
            return torch.argsort(qk_row_order(rows, self.n_head_kv))
        return None

    def packed(self, name: str) -> torch.Tensor:
        """A quantized tensor's blocks as (rows, row bytes) uint8 (a copy), rows in transformers' order."""
        t = self._get(name)
        qtype = t.tensor_type.name
        check_format(qtype, f"{self.path}: tensor {name}")
        rows = self.shape(name)[0]
        data = torch.from_numpy(np.array(t.data, copy=True)).reshape(rows, -1)
        order = self._row_order(name, rows)
        return data if order is None else data[order].contiguous()

    def dense(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Any tensor as floats in transformers' layout (quantized ones dequantized exactly); ``dtype``
        default: the stored dtype for F32/F16/BF16, fp32 for quantized tensors."""
        t = self._get(name)
        qtype = t.tensor_type.name
        shape = self.shape(name)
        if qtype in DENSE:
            raw = np.array(t.data, copy=True)
            out = torch.from_numpy(raw.view(np.uint16) if qtype == "BF16" else raw)
            out = (out.view(torch.bfloat16) if qtype == "BF16" else out).reshape(shape)
            order = self._row_order(name, shape[0])
            out = out if order is None else out[order].contiguous()
            return out if dtype is None else out.to(dtype)
        packed = self.packed(name)
        return dequantize(qtype, packed, (shape[0], int(np.prod(shape[1:]))), dtype or torch.float32).reshape(shape)

    def close(self) -> None:
        """Drop the memory map (tensors handed out are copies and stay valid)."""
        self._tensors.clear()
        self.reader = None  # the np.memmap goes with its last reference
