"""A failed call that changes a model leaves it exactly as it was: state dict, module tree,
requires_grad and adapter lists are compared with a picture taken before the call."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.errors import AdapterFileError, ConfigError, TargetNotFoundError
from lorakit.quant import quantize_model
from lorakit.quant.linear import QuantLinear

from fault_helpers import assert_same, picture, tiny_llama


def with_adapter(name="first", targets=("q_proj", "v_proj"), r=4):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=r, target_modules=list(targets), init_lora_weights=False), name)
    return model


@pytest.mark.parametrize("fresh", [True, False], ids=["plain-model", "model-with-adapter"])
def test_inject_modules_to_save_typo_leaves_model_unchanged(fresh):
    model = tiny_llama() if fresh else with_adapter()
    before = picture(model)
    cfg = lorakit.LoraConfig(r=4, target_modules=["q_proj", "k_proj"], modules_to_save=["lm_haed"])
    with pytest.raises(TargetNotFoundError, match="lm_haed"):
        lorakit.inject(model, cfg, "second")
    assert_same(before, picture(model))
    # and a later inject starts clean: nothing half-made is adopted
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["k_proj"]), "second")
    assert not any(".lora.second" in k and "q_proj" in k for k in model.state_dict())


def test_inject_interrupted_midway_leaves_model_unchanged(monkeypatch):
    from lorakit.layers.host import LoraLayer

    model = with_adapter()
    before = picture(model)
    calls = {"n": 0}
    real = LoraLayer.add

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C (or MemoryError) half-way through the targets
        return real(self, *a, **k)

    monkeypatch.setattr(LoraLayer, "add", flaky)
    with pytest.raises(KeyboardInterrupt):
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules="all-linear"), "second")
    assert calls["n"] == 3
    assert_same(before, picture(model))


def test_load_adapter_failures_leave_model_unchanged(tmp_path):
    src = with_adapter("x", r=4)
    lorakit.save_adapter(src, tmp_path / "good", "x")
    model = with_adapter("first", targets=("k_proj",))
    before = picture(model)

    # 1. the config names only targets the model lacks (fails inside inject; a file's extra
    #    modules_to_save names are skipped on purpose, as PEFT's SEQ_CLS files need)
    import json

    bad = tmp_path / "typo"
    lorakit.save_adapter(src, bad, "x")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_prjo"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TargetNotFoundError, match="q_prjo"):
        lorakit.load_adapter(model, bad, "new")
    assert_same(before, picture(model))

    # 2. the weights do not fit (fails after inject, while filling)
    other = tiny_llama()
    lorakit.inject(other, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]), "x")
    lorakit.save_adapter(other, tmp_path / "extra", "x")
    cfg = json.loads((tmp_path / "extra" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj"]
    (tmp_path / "extra" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match="o_proj"):
        lorakit.load_adapter(model, tmp_path / "extra", "new")
    assert_same(before, picture(model))

    # 3. the good one still loads afterwards, under the name that failed before
    lorakit.load_adapter(model, tmp_path / "good", "new")
    assert "new" in lorakit.list_adapters(model)


def test_quantize_model_failure_midway_restores_every_linear(monkeypatch):
    model = tiny_llama()
    before = picture(model)
    calls = {"n": 0}
    real = QuantLinear.from_linear.__func__

    def flaky(cls, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise MemoryError("simulated out-of-memory")
        return real(cls, *a, **k)

    monkeypatch.setattr(QuantLinear, "from_linear", classmethod(flaky))
    with pytest.raises(MemoryError):
        quantize_model(model, "nf4", compute_dtype=torch.float32)
    assert calls["n"] == 5
    assert_same(before, picture(model))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_combine_adapters_failure_midway_leaves_model_unchanged():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), "b")
    lorakit.set_adapter(model, ["a", "b"])
    before = picture(model)
    # q_proj (first host) has both adapters, v_proj only "a": 'linear' fails at the second host
    with pytest.raises(ConfigError, match="linear"):
        lorakit.combine_adapters(model, ["a", "b"], [0.5, 0.5], "ab", method="linear")
    assert_same(before, picture(model))
    lorakit.combine_adapters(model, ["a", "b"], [0.5, 0.5], "ab", method="cat")
    assert "ab" in lorakit.list_adapters(model)
