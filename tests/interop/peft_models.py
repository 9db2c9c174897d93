"""Tiny random-init transformers models (built from configs, no hub) and their inputs, shared by the
PEFT interop tests. ``MODELS[name] = (make(seed) -> model, inputs() -> kwargs)``; :func:`output`
gives the one tensor to compare."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft", reason="PEFT is the reference these interop tests compare with")
transformers = pytest.importorskip("transformers")

VOCAB = 100


def _ids(b=2, t=7, vocab=VOCAB, seed=1):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _seeded(build):
    def make(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return build(**overrides).eval()
    return make


def _llama(tie=False, cls=False, **kw):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                   tie_word_embeddings=tie, pad_token_id=0, num_labels=3, **kw)
    return (transformers.LlamaForSequenceClassification if cls else transformers.LlamaForCausalLM)(cfg)


def _t5(**kw):
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                decoder_start_token_id=0, **kw)
    return transformers.T5ForConditionalGeneration(cfg)


def _bart(**kw):
    kw.setdefault("scale_embedding", True)
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64, **kw)
    return transformers.BartForConditionalGeneration(cfg)


def _vit(**kw):
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=8, num_channels=3, num_labels=3, **kw)
    return transformers.ViTForImageClassification(cfg)


def _clip(**kw):
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=16, patch_size=8, projection_dim=16, **kw)
    return transformers.CLIPVisionModelWithProjection(cfg)


def _whisper(**kw):
    cfg = transformers.WhisperConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=8,
                                     max_target_positions=16, decoder_start_token_id=1, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2, suppress_tokens=None, begin_suppress_tokens=None,
                                     **kw)
    return transformers.WhisperForConditionalGeneration(cfg)


def _gemma(**kw):
    cfg = transformers.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=64,
                                   **kw)
    return transformers.GemmaForCausalLM(cfg)


def _gemma2(**kw):
    cfg = transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=64,
                                    sliding_window=16, **kw)
    return transformers.Gemma2ForCausalLM(cfg)


def _phi3(**kw):
    cfg = transformers.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2,
                                  **kw)
    return transformers.Phi3ForCausalLM(cfg)


def _neox(**kw):
    cfg = transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     vocab_size=VOCAB, max_position_embeddings=64, **kw)
    return transformers.GPTNeoXForCausalLM(cfg)


def _pixels():
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))}


def _seq2seq():
    return {"input_ids": _ids(), "decoder_input_ids": _ids(t=5, seed=3)}


def _audio():
    return {"input_features": torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(4)),
            "decoder_input_ids": _ids(t=5, seed=3)}


MODELS = {
    "llama": (_seeded(_llama), lambda: {"input_ids": _ids()}),
    "llama-tied": (_seeded(lambda **kw: _llama(tie=True, **kw)), lambda: {"input_ids": _ids()}),
    "llama-cls": (_seeded(lambda **kw: _llama(cls=True, **kw)), lambda: {"input_ids": _ids()}),
    "t5": (_seeded(_t5), _seq2seq),
    "bart": (_seeded(_bart), _seq2seq),
    "vit": (_seeded(_vit), _pixels),
    "clip": (_seeded(_clip), _pixels),
    "whisper": (_seeded(_whisper), _audio),
    "gemma": (_seeded(_gemma), lambda: {"input_ids": _ids()}),
    "gemma2": (_seeded(_gemma2), lambda: {"input_ids": _ids()}),
    "phi3": (_seeded(_phi3), lambda: {"input_ids": _ids()}),
    "gpt-neox": (_seeded(_neox), lambda: {"input_ids": _ids()}),
}


def output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    for name in ("logits", "image_embeds", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise AssertionError(f"no output tensor in {type(out).__name__}")


def perturb(model, seed: int = 7, scale: float = 0.2) -> None:
    """Move every trainable tensor (adapter factors, modules_to_save copies) so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def peft_config(**kw):
    kw.setdefault("init_lora_weights", False)  # random A and B: the adapter changes the output
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    return peft.LoraConfig(**kw)


def lorakit_config(**kw):
    import lorakit

    kw.setdefault("init_lora_weights", False)
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    return lorakit.LoraConfig(**kw)


def adapted_paths(model) -> set[str]:
    """Paths of the modules that carry a LoRA adapter, in PEFT's or lorakit's model."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    from lorakit.layers.host import LoraLayer

    return {p for p, m in model.named_modules() if isinstance(m, PeftLoraLayer | LoraLayer)}


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def peft_to_ours(theirs, make, inputs, path):
    """Perturb PEFT's adapter (its factors and any head copies), save it to ``path`` and load the file into
    a fresh ``make()`` with lorakit; return (lorakit's model, PEFT's output on ``inputs()``)."""
    import lorakit

    perturb(theirs)
    theirs.eval()
    want = output(theirs, inputs())
    theirs.save_pretrained(path)
    return lorakit.load_adapter(make(), path), want
