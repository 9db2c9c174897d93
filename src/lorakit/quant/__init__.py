"""Quantization for QLoRA: NF4 / FP4 / int8 weights, a frozen quantized linear layer, streaming
quantized loading of transformers checkpoints, k-bit training helpers and an 8-bit Adam.

    from lorakit.quant import load_quantized, prepare_for_kbit_training
    model = load_quantized("path/to/llama", quant_type="nf4", double_quant=True)
    model = prepare_for_kbit_training(model)
    model = lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))

See docs/QUANT.md for the formats, layouts and rounding rules.
"""

from .linear import QuantLinear
from .load_qlora import load_for_qlora
from .loading import load_quantized
from .merge import dequantize_and_merge, requantized_merge
from .model import quantize_model
from .optim import Adam8bit
from .training import prepare_for_kbit_training

__all__ = [
    "Adam8bit",
    "QuantLinear",
    "dequantize_and_merge",
    "load_for_qlora",
    "load_quantized",
    "prepare_for_kbit_training",
    "quantize_model",
    "requantized_merge",
]
