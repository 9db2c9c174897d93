import pytest
from torch import nn

import lorakit
from lorakit.errors import TargetNotFoundError, UnsupportedModuleError
from lorakit.layers.host import LoraLayer

from conftest import tiny_bert_cls, tiny_gpt2, tiny_llama


def adapted(model):
    return sorted(p for p, m in model.named_modules() if isinstance(m, LoraLayer))


def test_all_linear_skips_heads_and_freezes_everything_else():
    m = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules="all-linear"))
    paths = adapted(m)
    assert len(paths) == 2 * 7 and "lm_head" not in paths
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora.default.lora_" in n for n in trainable)
    b = lorakit.inject(tiny_bert_cls(), lorakit.LoraConfig(r=4, target_modules="all-linear"))
    assert "classifier" not in adapted(b) and "bert.pooler.dense" in adapted(b)
    g = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=4, target_modules="all-linear"))
    assert {p.rpartition(".")[2] for p in adapted(g)} == {"c_attn", "c_proj", "c_fc"}


def test_list_suffix_regex_exclude_layers():
    m = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "model.layers.1.mlp.up_proj"]))
    assert adapted(m) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj",
                          "model.layers.1.self_attn.q_proj"]
    m = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=r".*\.(k|v)_proj"))
    assert len(adapted(m)) == 4
    m = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules="all-linear", exclude_modules=["o_proj"]))
    assert not any(p.endswith("o_proj") for p in adapted(m))
    m = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[1]))
    assert adapted(m) == ["model.layers.1.self_attn.q_proj"]


def test_rank_and_alpha_patterns_apply():
    cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern={"layers.1.self_attn.q_proj": 2},
                             alpha_pattern={"layers.1.self_attn.q_proj": 6})
    m = lorakit.inject(tiny_llama(), cfg)
    a1 = m.model.layers[1].self_attn.q_proj.lora["default"]
    assert a1.lora_A.shape[0] == 2 and a1.scaling == 3.0
    assert m.model.layers[0].self_attn.q_proj.lora["default"].scaling == 2.0


def test_unknown_target_names_it_and_suggests():
    with pytest.raises(TargetNotFoundError, match=r"'q_prj'.*Did you mean 'q_proj'"):
        lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "q_prj"]))
    with pytest.raises(TargetNotFoundError, match="regex"):
        lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=r"nothing\..*"))
    with pytest.raises(TargetNotFoundError, match="no module is left"):
        lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], exclude_modules=["q_proj"]))
    with pytest.raises(lorakit.LorakitError, match="modules_to_save.*'scor'"):
        lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["scor"]))


def test_unsupported_module_type():
    with pytest.raises(UnsupportedModuleError, match=r"'model.layers.0.input_layernorm' is a LlamaRMSNorm"):
        lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["input_layernorm"]))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))  # LoRA on it is supported; DoRA is not
    with pytest.raises(UnsupportedModuleError, match="groups=2"):
        lorakit.inject(grouped, lorakit.LoraConfig(r=2, target_modules=["0"], use_dora=True))


def test_bias_modes_and_modules_to_save():
    m = lorakit.inject(tiny_bert_cls(), lorakit.LoraConfig(r=4, target_modules=["query"], bias="lora_only",
                                                          modules_to_save=["classifier"]))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "bert.encoder.layer.0.attention.self.query.base_layer.bias" in trainable
    assert "bert.encoder.layer.0.attention.self.key.bias" not in trainable
    assert "classifier.modules_to_save.default.weight" in trainable
    assert "classifier.original_module.weight" not in trainable
    m = lorakit.inject(tiny_bert_cls(), lorakit.LoraConfig(r=4, target_modules=["query"], bias="all"))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "bert.encoder.layer.0.attention.self.key.bias" in trainable


def test_bad_adapter_name_and_duplicate():
    m = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(lorakit.LorakitError, match="already has an adapter named 'default'"):
        lorakit.inject(m, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(lorakit.LorakitError, match="adapter name 'a.b'"):
        lorakit.inject(m, lorakit.LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="a.b")


def test_trainable_summary():
    m = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    s = lorakit.trainable_parameters(m)
    assert s.trainable == 2 * (4 * 32 + 32 * 4)
    assert s.total == sum(p.numel() for p in m.parameters())
    assert "trainable%" in str(s)
