"""Adapter files: round trips, PEFT's key format, strict shape checks, atomic writes, no unpickling."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.errors import AdapterFileError

from conftest import tiny_bert_cls, tiny_llama


def trained(model, cfg, name="default"):
    lorakit.inject(model, cfg, name)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_round_trip_identical_outputs(tmp_path, ids):
    cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"layers.1.self_attn.q_proj": 2})
    m = trained(tiny_llama(), cfg)
    with torch.no_grad():
        y = m(ids).logits
    out = lorakit.save_adapter(m, tmp_path / "ad")
    keys = load_file(out / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (32, 2)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and "q_proj" in conf["target_modules"]
    fresh = lorakit.load_adapter(tiny_llama(), out)
    assert not any(p.requires_grad for p in fresh.parameters())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, y)
    assert not list(out.glob(".*.tmp"))  # no temp files left behind


def test_modules_to_save_and_bias_round_trip(tmp_path, ids):
    cfg = lorakit.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], bias="lora_only")
    m = trained(tiny_bert_cls(), cfg)
    with torch.no_grad():
        y = m(input_ids=ids).logits
    lorakit.save_adapter(m, tmp_path / "ad")
    keys = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in keys
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in keys
    fresh = lorakit.load_adapter(tiny_bert_cls(), tmp_path / "ad", trainable=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, y)
    assert any(p.requires_grad for p in fresh.parameters())


def test_shape_mismatches_are_all_named_and_model_unchanged(tmp_path, ids):
    m = trained(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lorakit.save_adapter(m, tmp_path / "ad")
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    with pytest.raises(AdapterFileError) as err:
        lorakit.load_adapter(other, tmp_path / "ad")
    msg = str(err.value)
    assert msg.count("file has shape") == 8 and "(4, 32)" in msg and "(4, 48)" in msg
    assert lorakit.list_adapters(other) == []
    assert not any("lora" in n for n, _ in other.named_parameters())


def test_missing_and_unexpected_tensors(tmp_path):
    m = trained(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    path = lorakit.save_adapter(m, tmp_path / "ad")
    t = load_file(path / "adapter_model.safetensors")
    t.pop("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight")
    t["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(t, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterFileError, match=r"(?s)unexpected tensor .*layers\.9.*missing tensor .*layers\.1"):
        lorakit.load_adapter(tiny_llama(), path)


def test_bad_paths_and_files(tmp_path):
    with pytest.raises(AdapterFileError, match="not a directory"):
        lorakit.load_adapter(tiny_llama(), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFileError, match="no adapter_config.json"):
        lorakit.load_adapter(tiny_llama(), tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text("{bad")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        lorakit.load_adapter(tiny_llama(), tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}))
    with pytest.raises(AdapterFileError, match="neither adapter_model.safetensors"):
        lorakit.load_adapter(tiny_llama(), tmp_path / "empty")


def test_legacy_bin_loads_only_with_weights_only(tmp_path, ids):
    m = trained(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    path = lorakit.save_adapter(m, tmp_path / "ad")
    tensors = load_file(path / "adapter_model.safetensors")
    (path / "adapter_model.safetensors").unlink()
    torch.save(tensors, path / "adapter_model.bin")
    fresh = lorakit.load_adapter(tiny_llama(), path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, m(ids).logits)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, path / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="weights_only"):
        lorakit.load_adapter(tiny_llama(), path)


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    m = trained(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    path = lorakit.save_adapter(m, tmp_path / "ad")
    before = (path / "adapter_model.safetensors").read_bytes()
    import lorakit.io as io

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", broken)
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.lora["default"].lora_A.add_(1.0)
    with pytest.raises(OSError):
        lorakit.save_adapter(m, path)
    assert (path / "adapter_model.safetensors").read_bytes() == before
    assert not list(path.glob(".*.tmp"))
