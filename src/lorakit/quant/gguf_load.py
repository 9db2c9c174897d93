"""Build a transformers model from a GGUF file without ever holding its full-precision weights.

    GGUF metadata ──► transformers config ──► model skeleton on the meta device
    tensors, one at a time (memory-mapped file):
        quantized Linear weight (Q4_0/Q4_1/Q8_0/Q4_K/Q6_K) ──► QuantLinear over the packed blocks
        quantized token embedding                          ──► GGUFEmbedding (rows dequantized on lookup)
        anything else (norms, F32/F16 tensors)             ──► a dense copy in ``dtype``
    tied output head (no ``output.weight`` in the file)    ──► shares the embedding's blocks

With ``keep_quantized=False`` every tensor is dequantized (exactly, with ``gguf``'s arithmetic) into
ordinary ``nn.Linear``/``nn.Embedding`` weights — what transformers' ``from_pretrained(gguf_file=)``
gives, without its full-file staging. A model with any tensor still on the meta device is never
returned.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import QuantizationError
from ..validate import check_bool
from .gguf_codecs import DENSE, FORMATS, check_format
from .gguf_config import config_from_gguf
from .gguf_linear import GGUFEmbedding, GGUFLayout, GGUFWeight, gguf_linear
from .gguf_read import IGNORED, GGUFFile
from .linear import QuantLinear, check_compute_dtype


def load_gguf(path: str | os.PathLike, keep_quantized: bool = True, compute_dtype: torch.dtype = torch.float32,
              dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM built from the GGUF file ``path`` (Llama / SmolLM2 / Mistral / Qwen2 / Qwen3).

    ``keep_quantized``: keep quantized tensors packed (a frozen GGUF base for LoRA, ≈ the file's size
    in memory); else dequantize them. ``compute_dtype``: the matmul dtype of the packed layers.
    ``dtype``: of dense tensors (norms, dequantized weights) and of what the packed layers return
    from ``dequantize_weight`` by default.
    """
    check_compute_dtype(compute_dtype)
    check_bool("keep_quantized", keep_quantized, QuantizationError)  # "no" read as True before
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise QuantizationError(f"dtype={dtype!r}: the dtype of the dense tensors must be a floating-point "
                                "torch.dtype, e.g. torch.float32 or torch.bfloat16.")
    f = GGUFFile(path)
    try:
        f.require_supported()
        model = _skeleton(config_from_gguf(f))
        _fill(model, f, keep_quantized, compute_dtype, dtype)
    finally:
        f.close()
        _release_heap()
    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise QuantizationError(
            f"{path} lacks {len(left)} tensor(s) the {type(model).__name__} needs, e.g. {left[:5]}; the file is "
            "incomplete or its metadata does not match its tensors."
        )
    model.config._name_or_path = str(path)  # saved adapters record the file as their base
    return model.eval()


def _release_heap() -> None:
    """Give the reader's freed memory back to the OS: parsing the metadata makes ~10⁵ small numpy
    objects (one per vocabulary token and merge) whose heap pages glibc otherwise keeps (≈ 180 MiB of
    RSS on SmolLM2's 49k vocabulary)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


def _skeleton(config) -> nn.Module:
    import transformers
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta, buffers (rotary inv_freq) real
        return transformers.AutoModelForCausalLM.from_config(config)


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _fill(model: nn.Module, f: GGUFFile, keep_quantized: bool, compute_dtype, dtype) -> None:
    done: set[str] = set()
    embed_weight: GGUFWeight | None = None
    for name in f.names():
        if name in done or name in IGNORED:
            continue
        hf = f.hf_name(name)
        if hf is None:
            raise QuantizationError(
                f"{f.path}: tensor {name!r} has no place in a transformers {f.architecture} model; the file is "
                "not a plain decoder of this architecture (adapters, vision towers and MoE experts are not read)."
            )
        path, _, attr = hf.rpartition(".")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise QuantizationError(f"{f.path}: tensor {name!r} maps to {hf}, which the model built from the "
                                    "file's metadata lacks (check block_count and the architecture).") from None
        qtype = f.qtype(name)
        packed_ok = keep_quantized and qtype in FORMATS and attr == "weight"
        if packed_ok and isinstance(module, nn.Linear):
            _check(f, name, f.shape(name), tuple(module.weight.shape))
            bias_name = name[: -len("weight")] + "bias"
            bias = f.dense(bias_name, dtype) if f.has(bias_name) else None
            done.add(bias_name)
            _set(model, path, gguf_linear(f.packed(name), qtype, f.shape(name), bias, compute_dtype, dtype))
        elif packed_ok and isinstance(module, nn.Embedding):
            _check(f, name, f.shape(name), tuple(module.weight.shape))
            embed_weight = GGUFWeight(f.packed(name), GGUFLayout(f.shape(name), qtype, dtype))
            _set(model, path, GGUFEmbedding(embed_weight, module.padding_idx, dtype))
        else:
            if keep_quantized and qtype not in FORMATS and qtype not in DENSE:
                check_format(qtype, f"{f.path}: tensor {name}")
            current = getattr(module, attr, None)
            if not isinstance(current, torch.Tensor):
                raise QuantizationError(f"{f.path}: tensor {name!r} maps to {hf}, which is not a tensor of the model.")
            _check(f, name, f.shape(name), tuple(current.shape))
            t = f.dense(name, dtype)
            if attr in module._buffers:
                module._buffers[attr] = t
            else:
                module._parameters[attr] = nn.Parameter(t, requires_grad=False)
        done.add(name)
    if getattr(model.config, "tie_word_embeddings", False) and not f.has("output.weight"):
        head_path = next(p for p, m in model.named_modules() if m is model.get_output_embeddings())
        if embed_weight is not None:  # the head reads the embedding's blocks: no second copy
            _set(model, head_path, QuantLinear(embed_weight, None, compute_dtype))
        else:
            model.get_output_embeddings().weight = model.get_input_embeddings().weight


def _check(f: GGUFFile, name: str, got: tuple, expected: tuple) -> None:
    if got != expected:
        raise QuantizationError(
            f"{f.path}: tensor {name} has shape {got}, but the model built from the file's metadata expects "
            f"{expected}; the metadata (embedding_length, feed_forward_length, head counts) does not match the tensors."
        )
