"""Exporting LoRA adapters as llama.cpp adapter GGUFs: metadata, tensor names and layouts, the q/k
permutation and folded per-module scales, checked against the textbook formulas (llama.cpp's
scale alpha / r, the converter's permutation written in gguf_helpers). llama.cpp itself runs the
exported adapters in test_gguf_llamacpp.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf_helpers import HEADS, KV_HEADS, gguf, permute_qk, tiny_llama_model, tokenizer_vocab, write_tiny_gguf

import lorakit
from lorakit.errors import ConfigError, LorakitError
from lorakit.quant.gguf_export import export_gguf_adapter
from lorakit.quant.gguf_load import load_gguf


def _adapter(tmp_path, base_path, config: lorakit.LoraConfig, seed=0):
    model = load_gguf(base_path)
    model = lorakit.inject(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_A" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    out = tmp_path / "adapter"
    lorakit.save_adapter(model, out)
    return model, out


def _read(path):
    r = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: np.array(t.data).reshape([int(n) for n in reversed(t.shape.tolist())]) for t in r.tensors}
    return meta, tensors


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "base.gguf"
    write_tiny_gguf(path, qtype="Q8_0")
    return path


@pytest.mark.parametrize("rslora", [False, True])
def test_layout_scales_and_permutation(tmp_path, base, rslora):
    cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                             rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}, use_rslora=rslora)
    model, adapter = _adapter(tmp_path, base, cfg)
    out = export_gguf_adapter(adapter, tmp_path / "lora.gguf", base)
    meta, tensors = _read(out)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama" and meta["adapter.lora.alpha"] == 8.0
    weights = lorakit.io.read_adapter_weights(adapter)
    for i in range(2):
        for hf, g, heads in (("self_attn.q_proj", "attn_q", HEADS), ("self_attn.k_proj", "attn_k", KV_HEADS),
                             ("self_attn.v_proj", "attn_v", None), ("mlp.down_proj", "ffn_down", None)):
            key = f"base_model.model.model.layers.{i}.{hf}"
            A, B = weights[key + ".lora_A.weight"].numpy(), weights[key + ".lora_B.weight"].numpy()
            r = A.shape[0]
            alpha = 3 if "v_proj" in hf else 8
            s = alpha / (r ** 0.5 if rslora else r)
            expected = s * (B @ A)  # lorakit's ΔW in transformers' row order
            if heads:
                expected = permute_qk(expected, heads)  # the base GGUF's row order
            a, b = tensors[f"blk.{i}.{g}.weight.lora_a"], tensors[f"blk.{i}.{g}.weight.lora_b"]
            assert a.shape == A.shape and b.shape == B.shape
            got = (meta["adapter.lora.alpha"] / a.shape[0]) * (b @ a)  # what llama.cpp applies
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_cli_export(tmp_path, base):
    _, adapter = _adapter(tmp_path, base, lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"]))
    from lorakit.cli import main

    assert main(["export", str(adapter), "--format", "gguf", "--base", str(base), "--outtype", "f16"]) == 0
    meta, tensors = _read(adapter / "adapter.gguf")
    assert sorted(tensors) == [f"blk.{i}.attn_output.weight.lora_{x}" for i in range(2) for x in "ab"]
    assert tensors["blk.0.attn_output.weight.lora_a"].dtype == np.float16


# -- bad input -------------------------------------------------------------------------------------
def test_tied_head_has_no_tensor(tmp_path, base):
    _, adapter = _adapter(tmp_path, base, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    # an adapter that also targets the (tied) output head, as a file
    w = lorakit.io.read_adapter_weights(adapter)
    w["base_model.model.lm_head.lora_A.weight"] = torch.zeros(2, 256)
    w["base_model.model.lm_head.lora_B.weight"] = torch.zeros(len(tokenizer_vocab()[0]), 2)
    from safetensors.torch import save_file

    save_file(w, str(adapter / "adapter_model.safetensors"))
    out = tmp_path / "x.gguf"
    with pytest.raises(ConfigError, match="'lm_head' has no tensor.*tied output head.*retrain without"):
        export_gguf_adapter(adapter, out, base)
    assert not out.exists()


def test_classifier_head_has_no_tensor(tmp_path, base):
    _, adapter = _adapter(tmp_path, base, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    w = lorakit.io.read_adapter_weights(adapter)
    w["base_model.model.score.lora_A.weight"] = torch.zeros(2, 256)
    w["base_model.model.score.lora_B.weight"] = torch.zeros(3, 2)
    from safetensors.torch import save_file

    save_file(w, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match="'score' has no tensor.*not part of the GGUF decoder"):
        export_gguf_adapter(adapter, tmp_path / "x.gguf", base)


def test_architecture_mismatch(tmp_path, base):
    _, adapter = _adapter(tmp_path, base, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    qwen = tmp_path / "qwen.gguf"
    write_tiny_gguf(qwen, tiny_llama_model(3, arch="qwen2"), arch="qwen2", qtype="Q8_0")
    with pytest.raises(ConfigError, match="trained on a 'llama' model.*architecture 'qwen2'.*--base"):
        export_gguf_adapter(adapter, tmp_path / "x.gguf", qwen)


def test_shape_mismatch_names_module(tmp_path, base):
    _, adapter = _adapter(tmp_path, base, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None  # no architecture hint: the shapes decide
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    small = tmp_path / "small.gguf"
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     vocab_size=len(tokenizer_vocab()[0])))
    write_tiny_gguf(small, m.eval(), qtype="Q8_0")
    with pytest.raises(LorakitError, match="q_proj has lora_A.*belongs to another model"):
        export_gguf_adapter(adapter, tmp_path / "x.gguf", small)
