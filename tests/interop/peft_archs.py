"""More tiny random-init transformers models (hidden 32, 2 layers, vocab 100; built from configs, no hub)
for the architecture sweep in ``test_peft_archs.py``. ``ARCHS[name] = (make(seed) -> model, inputs() ->
kwargs)``, the same contract as ``peft_models.MODELS``."""

from __future__ import annotations

import torch
from peft_models import VOCAB, _ids, _pixels, _seeded, _seq2seq, transformers

T = transformers
# The shared decoder geometry (Llama-like configs).
_DEC = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
            max_position_embeddings=64)
_ENC = dict(_DEC, type_vocab_size=2)
_S2S = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
_MOE = dict(_DEC, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


def _build(model_cls: str, config_cls: str, **kw):
    return lambda **over: getattr(T, model_cls)(getattr(T, config_cls)(**{**kw, **over}))


def _text():
    return {"input_ids": _ids()}


def _wave():
    return {"input_values": torch.randn(2, 400, generator=torch.Generator().manual_seed(5))}


# name: (model class, config class, config kwargs, inputs)
_SPECS = {
    "opt": ("OPTForCausalLM", "OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                                vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=32),
            _text),
    "bloom": ("BloomForCausalLM", "BloomConfig", dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB), _text),
    "falcon": ("FalconForCausalLM", "FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                         vocab_size=VOCAB, new_decoder_architecture=True,
                                                         num_kv_heads=2), _text),
    "falcon-old": ("FalconForCausalLM", "FalconConfig", dict(hidden_size=32, num_hidden_layers=2,
                                                             num_attention_heads=4, vocab_size=VOCAB,
                                                             new_decoder_architecture=False, multi_query=True),
                   _text),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(_DEC, num_key_value_heads=2), _text),
    "qwen2-cls": ("Qwen2ForSequenceClassification", "Qwen2Config", dict(_DEC, num_key_value_heads=2, num_labels=3,
                                                                        pad_token_id=0), _text),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(_MOE, shared_expert_intermediate_size=32), _text),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(_MOE, head_dim=8), _text),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(_DEC, num_key_value_heads=2, num_local_experts=4,
                                                            num_experts_per_tok=2), _text),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(_DEC, num_key_value_heads=2), _text),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(_DEC, num_key_value_heads=2, head_dim=8), _text),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(_DEC, num_key_value_heads=2, head_dim=8), _text),
    "gptj": ("GPTJForCausalLM", "GPTJConfig", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                                   rotary_dim=4, bos_token_id=0, eos_token_id=0), _text),
    "codegen": ("CodeGenForCausalLM", "CodeGenConfig", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB,
                                                            n_positions=64, n_ctx=64, rotary_dim=4, bos_token_id=0,
                                                            eos_token_id=0), _text),
    "stablelm": ("StableLmForCausalLM", "StableLmConfig", dict(_DEC, num_key_value_heads=2), _text),
    "starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Config", dict(_DEC, num_key_value_heads=2), _text),
    "olmo": ("OlmoForCausalLM", "OlmoConfig", dict(_DEC, num_key_value_heads=2, pad_token_id=0, eos_token_id=0),
             _text),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", dict(_DEC, num_key_value_heads=2, pad_token_id=0, eos_token_id=0),
              _text),
    "granite": ("GraniteForCausalLM", "GraniteConfig", dict(_DEC, num_key_value_heads=2), _text),
    "phi": ("PhiForCausalLM", "PhiConfig", dict(_DEC, num_key_value_heads=4), _text),
    "gpt_bigcode": ("GPTBigCodeForCausalLM", "GPTBigCodeConfig", dict(n_embd=32, n_layer=2, n_head=4,
                                                                      vocab_size=VOCAB, n_positions=64,
                                                                      bos_token_id=0, eos_token_id=0), _text),
    "mpt": ("MptForCausalLM", "MptConfig", dict(d_model=32, n_layers=2, n_heads=4, vocab_size=VOCAB, max_seq_len=64,
                                                expansion_ratio=2), _text),
    "roberta-cls": ("RobertaForSequenceClassification", "RobertaConfig", dict(_ENC, num_labels=3), _text),
    "deberta-v2-cls": ("DebertaV2ForSequenceClassification", "DebertaV2Config", dict(_ENC, num_labels=3), _text),
    "distilbert-cls": ("DistilBertForSequenceClassification", "DistilBertConfig",
                       dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=VOCAB,
                            max_position_embeddings=64, num_labels=3), _text),
    "electra-cls": ("ElectraForSequenceClassification", "ElectraConfig", dict(_ENC, embedding_size=16, num_labels=3),
                    _text),
    "xlm-roberta-mlm": ("XLMRobertaForMaskedLM", "XLMRobertaConfig", _ENC, _text),
    "mbart": ("MBartForConditionalGeneration", "MBartConfig", _S2S, _seq2seq),
    "pegasus": ("PegasusForConditionalGeneration", "PegasusConfig", _S2S, _seq2seq),
    "swin": ("SwinForImageClassification", "SwinConfig", dict(image_size=16, patch_size=4, embed_dim=16, depths=[1, 1],
                                                              num_heads=[2, 2], window_size=2, num_labels=3), _pixels),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig", dict(hidden_sizes=[16, 32], depths=[1, 1],
                                                                          num_stages=2, num_labels=3,
                                                                          layer_scale_init_value=1.0), _pixels),
    "wav2vec2-cls": ("Wav2Vec2ForSequenceClassification", "Wav2Vec2Config",
                     dict(_DEC, conv_dim=(16, 16), conv_stride=(4, 2), conv_kernel=(8, 4), num_conv_pos_embeddings=8,
                          num_conv_pos_embedding_groups=4, num_labels=3), _wave),
    "mamba": ("MambaForCausalLM", "MambaConfig", dict(hidden_size=32, num_hidden_layers=2, vocab_size=VOCAB,
                                                      state_size=4, expand=2, conv_kernel=4), _text),
}

ARCHS = {name: (_seeded(_build(m, c, **kw)), inputs) for name, (m, c, kw, inputs) in _SPECS.items()}
#: name → transformers ``config.model_type`` (read from the config class: nothing is built)
MODEL_TYPES = {name: getattr(T, c).model_type for name, (_, c, _, _) in _SPECS.items()}
