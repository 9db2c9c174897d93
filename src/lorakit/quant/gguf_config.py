"""The transformers config of a GGUF checkpoint, from its metadata (llama.cpp's key names).

lorakit builds it itself for the architectures it reads (a dozen keys; transformers' own route
parses the whole vocabulary first). Keys are ``<arch>.<key>`` (gguf-py constants.py):

    block_count → num_hidden_layers          embedding_length → hidden_size
    feed_forward_length → intermediate_size  context_length → max_position_embeddings
    attention.head_count(_kv) → num_attention_heads / num_key_value_heads
    attention.key_length → head_dim          attention.layer_norm_rms_epsilon → rms_norm_eps
    rope.freq_base → rope_theta              no ``output.weight`` tensor → tie_word_embeddings
"""

from __future__ import annotations

import math
import numbers

from ..errors import QuantizationError
from .gguf_read import GGUFFile

_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def config_from_gguf(f: GGUFFile):
    """A ``transformers.PretrainedConfig`` for the causal LM stored in ``f``."""
    from transformers import AutoConfig

    spec = f.require_supported()
    arch = spec.gguf_arch

    def key(name, default=None, required=True):
        value = f.field(f"{arch}.{name}", default)
        if value is None and required:
            raise QuantizationError(f"{f.path}: metadata key {arch}.{name} is missing; the GGUF file is incomplete.")
        return value

    if f.has("rope_freqs.weight") or f.field(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise QuantizationError(
            f"{f.path}: the model uses RoPE scaling ({arch}.rope.scaling / rope_freqs), which lorakit's GGUF reader "
            "does not rebuild; start from the original transformers checkpoint of this model."
        )
    def whole(name, default=None, required=True, minimum=1):
        """An integer metadata value ≥ ``minimum``: a 0 or a string used to fail deep in transformers."""
        value = key(name, default, required)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                or value != int(value) or value < minimum:
            raise QuantizationError(f"{f.path}: metadata {arch}.{name}={value!r} must be an integer ≥ {minimum}; the "
                                    "GGUF file is damaged or was written by another tool.")
        return int(value)

    def positive(name, default=None, required=True):
        value = key(name, default, required)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            raise QuantizationError(f"{f.path}: metadata {arch}.{name}={value!r} must be a finite number > 0; the "
                                    "GGUF file is damaged or was written by another tool.")
        return float(value)

    hidden, heads = whole("embedding_length"), whole("attention.head_count")
    kv_heads = whole("attention.head_count_kv", heads, required=False)
    if hidden % heads or heads % kv_heads:  # transformers' own check is a raw ValueError / ZeroDivisionError
        raise QuantizationError(f"{f.path}: metadata {arch}.attention.head_count={heads} / head_count_kv={kv_heads} "
                                f"do not divide embedding_length={hidden} / head_count; the GGUF file is damaged.")
    vocab = f.field(f"{arch}.vocab_size") or f.shape("token_embd.weight")[0]
    kwargs = dict(
        num_hidden_layers=whole("block_count", minimum=0),
        hidden_size=hidden,
        intermediate_size=whole("feed_forward_length"),
        max_position_embeddings=whole("context_length", 2048, required=False),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=whole("attention.key_length", hidden // heads, required=False),
        rms_norm_eps=positive("attention.layer_norm_rms_epsilon"),
        rope_theta=positive("rope.freq_base", 10000.0, required=False),
        vocab_size=int(vocab),
        tie_word_embeddings=not f.has("output.weight"),
        bos_token_id=f.field("tokenizer.ggml.bos_token_id"),
        eos_token_id=f.field("tokenizer.ggml.eos_token_id"),
        pad_token_id=f.field("tokenizer.ggml.padding_token_id"),
    )
    if arch == "llama":
        kwargs["attention_bias"] = f.has("blk.0.attn_q.bias")
        kwargs["mlp_bias"] = f.has("blk.0.ffn_up.bias")
    config = AutoConfig.for_model(_MODEL_TYPE[arch], **kwargs)
    if getattr(config, "rope_parameters", None) is not None:  # transformers ≥ 5 keeps theta here
        config.rope_parameters = {"rope_type": "default", "rope_theta": kwargs["rope_theta"]}
    return config
