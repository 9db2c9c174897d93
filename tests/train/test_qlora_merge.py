"""`lorakit merge` on a QLoRA adapter: dequantize → add → 16/32-bit export by default (checked against
bitsandbytes' NF4 dequantization plus s·B·A from the adapter file), requantized only when asked."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli.commands import merge
from lorakit.errors import ConfigError
from lorakit.train import train

from .train_helpers import quick_args

KEY = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def qlora_adapter(tmp_path_factory, tiny_lm):
    from lorakit.tasks import write_jsonl

    tmp = tmp_path_factory.mktemp("qlora_merge")
    data = write_jsonl("rev", tmp / "train.jsonl", n=16, seed=0)
    train(quick_args(tiny_lm, data, tmp / "run", quant="nf4", double_quant=False, max_steps=3, eval_rows=0,
                     target_modules=["q_proj", "v_proj"]))
    return tmp / "run" / "adapter"


def _bnb_nf4(bnb_f, w):
    # flattened: bitsandbytes' CPU dequantizer mis-indexes 2-D blocks when a row is shorter than a block
    q, state = bnb_f.quantize_4bit(w.reshape(-1), blocksize=64, quant_type="nf4", compress_statistics=False)
    return bnb_f.dequantize_4bit(q, state).float().view(w.shape)


def test_default_merge_is_dequantized_base_plus_delta(qlora_adapter, tiny_lm, tmp_path):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    out = merge(str(qlora_adapter), str(tmp_path / "merged"), model=str(tiny_lm))
    merged = load_file(out / "model.safetensors")
    base = load_file(tiny_lm / "model.safetensors")
    ad = load_file(qlora_adapter / "adapter_model.safetensors")
    cfg = json.loads((qlora_adapter / "adapter_config.json").read_text())
    w_deq = _bnb_nf4(bnb_f, base["model.layers.0.self_attn.q_proj.weight"])
    delta = (cfg["lora_alpha"] / cfg["r"]) * ad[KEY + ".lora_B.weight"] @ ad[KEY + ".lora_A.weight"]
    assert delta.abs().max() > 0  # the adapter trained
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], w_deq + delta, rtol=1e-5, atol=1e-6)
    # a layer without an adapter is the dequantized base; the head and embeddings were never quantized
    k = base["model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(merged["model.layers.1.self_attn.k_proj.weight"], _bnb_nf4(bnb_f, k))
    assert torch.equal(merged["lm_head.weight"], base["lm_head.weight"])
    assert not any("lora" in k or "weight_packed" in k for k in merged)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # a plain transformers checkpoint


def test_requantized_merge_only_when_asked_and_reports_its_error(qlora_adapter, tiny_lm, tmp_path, capsys):
    dense = load_file(merge(str(qlora_adapter), str(tmp_path / "d"), model=str(tiny_lm)) / "model.safetensors")
    out = merge(str(qlora_adapter), str(tmp_path / "rq"), model=str(tiny_lm), requantize=True)
    assert "relative output error" in capsys.readouterr().out
    report = json.loads((out / "lorakit_requant_report.json").read_text())
    assert set(report["per_layer"]) == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    requant = load_file(out / "model.safetensors")
    w, ref = requant["model.layers.0.self_attn.q_proj.weight"], dense["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(w, ref)
    # the reported error is the measured one (independently: relative output error on random inputs)
    x = torch.randn(256, w.shape[1], generator=torch.Generator().manual_seed(1))
    measured = float((x @ w.T - x @ ref.T).norm() / (x @ ref.T).norm())
    assert 0 < report["max"] < 0.3 and abs(measured - report["per_layer"]["model.layers.0.self_attn.q_proj"]) < 0.05


def test_requantize_refused_for_a_plain_adapter(tiny_lm, tmp_path):
    from lorakit.tasks import write_jsonl

    data = write_jsonl("rev", tmp_path / "t.jsonl", n=8, seed=0)
    train(quick_args(tiny_lm, data, tmp_path / "p", max_steps=1, eval_rows=0))
    with pytest.raises(ConfigError, match="--requantize applies to QLoRA"):
        merge(str(tmp_path / "p" / "adapter"), str(tmp_path / "m"), model=str(tiny_lm), requantize=True)
    assert not (tmp_path / "m").exists()
