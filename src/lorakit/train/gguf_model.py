"""Training and inference on a GGUF checkpoint (``--model path/to/model.gguf``).

``quant=gguf`` keeps the file's quantized weights packed as the frozen base (Q4_0/Q4_1/Q8_0/Q4_K/Q6_K,
dequantized on the fly, bit-exact with llama.cpp's arithmetic), so the adapter trains against exactly
the weights llama.cpp serves, at the file's size in memory. ``quant=none`` dequantizes every tensor
(the same values, in fp32: what transformers' ``gguf_file=`` loading gives); ``quant=nf4|fp4|int8``
dequantizes and re-quantizes with lorakit.quant. The tokenizer and chat template come from the file.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

GGUF_SUFFIX = ".gguf"


def is_gguf(path: Path | str | None) -> bool:
    return path is not None and Path(path).suffix.lower() == GGUF_SUFFIX


def gguf_tokenizer(path: Path):
    from ..quant.gguf_read import GGUFFile

    f = GGUFFile(path)
    try:
        return f.tokenizer()
    finally:
        f.close()


def gguf_causal_lm(path: Path, quant: str, bf16: bool = False):
    """The causal LM of ``path``: packed (quant="gguf") or dequantized to fp32 (anything else; the caller
    applies nf4/fp4/int8 afterwards)."""
    import torch

    from ..quant.gguf_load import load_gguf

    compute = torch.bfloat16 if bf16 else torch.float32
    return load_gguf(path, keep_quantized=quant == "gguf", compute_dtype=compute)


def check_gguf_task(path: Path, task: str) -> None:
    if task == "seq-cls":
        raise ConfigError(
            f"--model {path}: a GGUF file holds a causal language model; a sequence classifier needs a transformers "
            "checkpoint (a directory with config.json). Use task=causal-lm with instruction/chat data instead."
        )
