"""load_quantized: streaming a (sharded) safetensors checkpoint into a quantized model, and every
way a checkpoint can fail to fit."""

from __future__ import annotations

import json

import pytest
import torch
from qhelpers import one_thread  # noqa: F401  (fixture)
from safetensors.torch import load_file, save_file

from lorakit.errors import QuantizationError
from lorakit.quant import QuantLinear, load_quantized, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _write(path, tie=False, shard="40KB", seed=0, bias=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, tie_word_embeddings=tie,
                      attention_bias=bias)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path, max_shard_size=shard)
    return path


def _reference(path, **kw):
    from transformers import AutoModelForCausalLM

    return quantize_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16), **kw)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("sharded"))


def _index(path):
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def _meta_left(model):
    return [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]


@pytest.mark.parametrize("tie,bias", [(False, False), (True, False), (False, True)])
def test_sharded_matches_from_pretrained_then_quantize(tmp_path, tie, bias, ids):
    path = _write(tmp_path, tie=tie, bias=bias)
    assert len(set(_index(path).values())) > 1
    model = load_quantized(path)
    ref = _reference(path)
    assert torch.equal(model(ids).logits, ref(ids).logits)
    assert not _meta_left(model) and not model.training
    assert isinstance(model.model.layers[1].mlp.up_proj, QuantLinear)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # kept in its checkpoint dtype
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    q_proj = model.model.layers[0].self_attn.q_proj
    assert (q_proj.bias is not None) == bias and (not bias or not q_proj.bias.requires_grad)


def test_single_file_and_options(tmp_path, ids):
    path = _write(tmp_path, shard="100MB")
    assert (path / "model.safetensors").is_file()
    model = load_quantized(path, quant_type="int8", skip=["o_proj"], dtype=torch.float32,
                           compute_dtype=torch.float32)
    ref = _reference(path, quant_type="int8", skip=["o_proj"], compute_dtype=torch.float32)
    assert type(model.model.layers[0].self_attn.o_proj).__name__ == "Linear"
    assert model.model.layers[0].self_attn.o_proj.weight.dtype == torch.float32
    torch.testing.assert_close(model(ids).logits, ref.float()(ids).logits, rtol=2e-2, atol=2e-2)


def test_shard_missing_a_tensor_named_in_the_index(tmp_path):
    path = _write(tmp_path)
    name, shard = next((n, f) for n, f in _index(path).items() if "k_proj" in n)
    tensors = load_file(path / shard)
    del tensors[name]
    save_file(tensors, path / shard, metadata={"format": "pt"})
    with pytest.raises(QuantizationError, match=rf"{shard} lacks 1 tensor.*{name}"):
        load_quantized(path)


def test_tensor_missing_everywhere(tmp_path):
    path = _write(tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.layers.1.post_attention_layernorm.weight"
    shard = index["weight_map"].pop(name)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    tensors = load_file(path / shard)
    del tensors[name]
    save_file(tensors, path / shard, metadata={"format": "pt"})
    with pytest.raises(QuantizationError, match=rf"lacks 1 tensor.*{name}.*No model was returned"):
        load_quantized(path)


def test_missing_shard_file(tmp_path):
    path = _write(tmp_path)
    shard = sorted(set(_index(path).values()))[-1]
    (path / shard).unlink()
    with pytest.raises(QuantizationError, match=rf"missing.*{shard}"):
        load_quantized(path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    path = _write(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizationError, match=r"mlp\.\w+_proj\.weight in .* has shape \(\d+, \d+\).*expects"):
        load_quantized(path)


def test_unsupported_weight_dtype(tmp_path):
    path = _write(tmp_path, shard="100MB")
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = torch.zeros(tensors[name].shape, dtype=torch.int8)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QuantizationError, match=rf"{name} in model.safetensors has dtype torch.int8"):
        load_quantized(path)


def test_unexpected_tensor_warns(tmp_path):
    path = _write(tmp_path, shard="100MB")
    tensors = load_file(path / "model.safetensors")
    tensors["model.extra.weight"] = torch.zeros(3)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="model.extra.weight"):
        load_quantized(path)


def test_bad_directory_and_options(tmp_path, sharded):
    with pytest.raises(QuantizationError, match="config.json"):
        load_quantized(tmp_path)
    (tmp_path / "config.json").write_text((sharded / "config.json").read_text())
    with pytest.raises(QuantizationError, match="neither model.safetensors"):
        load_quantized(tmp_path)
    with pytest.raises(QuantizationError, match="blocksize"):
        load_quantized(sharded, blocksize=48)
    with pytest.raises(QuantizationError, match="tied"):
        _write(tmp_path / "tied", tie=True)
        load_quantized(tmp_path / "tied", quantize_head=True)
