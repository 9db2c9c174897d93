"""Merging LoRA into a quantized base: dequantized merge (a normal checkpoint) and requantized merge."""

from __future__ import annotations

import pytest
import torch
from qhelpers import one_thread  # noqa: F401  (fixture)

import lorakit
from lorakit.quant import QuantLinear, dequantize_and_merge, quantize_model, requantized_merge
from lorakit.state import lora_layers

from conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained(seed=0):
    torch.manual_seed(seed)
    model = quantize_model(tiny_llama(), compute_dtype=torch.float32)
    cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                             init_lora_weights=False)  # B ≠ 0: a non-trivial ΔW
    return lorakit.inject(model, cfg)


def test_dequantize_and_merge_equals_the_adapted_model(ids, tmp_path):
    model = _trained()
    with torch.no_grad():
        ref = model(ids).logits
    merged = dequantize_and_merge(model, dtype=torch.float32)
    assert not list(lora_layers(merged))
    assert not any(isinstance(m, QuantLinear) for m in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    with torch.no_grad():
        out = merged(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, out)


def test_dequantize_and_merge_default_dtype_is_the_weights():
    model = quantize_model(tiny_llama().to(torch.bfloat16))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules="all-linear"))
    merged = dequantize_and_merge(model)
    assert merged.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16


def test_requantized_merge_reports_its_error(ids):
    model = _trained()
    with torch.no_grad():
        ref = model(ids).logits
    out_model, report = requantized_merge(model)
    assert set(report.per_layer) == {f"model.layers.{i}.{m}" for i in range(2)
                                     for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")}
    assert 0 < report.mean <= report.max < 0.2  # one more NF4 rounding: ~0.1 relative on random inputs
    assert "requantized merge of 6 layers" in str(report)
    q = out_model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.quant_type == "nf4" and q.layout.double_quant
    assert not list(lora_layers(out_model))
    with torch.no_grad():
        assert ((out_model(ids).logits - ref).norm() / ref.norm()) < 0.2


def test_requantized_merge_to_int8_is_more_accurate():
    _, nf4_report = requantized_merge(_trained(1))
    _, int8_report = requantized_merge(_trained(1), quant_type="int8")
    assert int8_report.max < nf4_report.mean / 5
