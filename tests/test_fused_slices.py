"""LoraConfig.fused_slices: LoRA on chosen output slices of a fused projection (GPT-2 c_attn, Phi-3
qkv_proj, GPT-NeoX query_key_value), checked against a naive formula written here and against PEFT."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.adapter_kinds.sliced import SlicedAdapter
from lorakit.errors import ConfigError
from lorakit.state import lora_layers, model_state

from conftest import tiny_gpt2

ENABLE = [True, False, True]


def naive_delta(a: torch.Tensor, b: torch.Tensor, fan_out: int, enable, r: int, scaling: float, heads: int = 1):
    """ΔW (fan_out, in) from loralib-layout factors, by loops: slice t of head h is rows
    h·n·d + t·d … + d with n = len(enable), d = fan_out / (heads·n)."""
    n = len(enable)
    d = fan_out // (heads * n)
    delta = torch.zeros(fan_out, a.shape[1])
    j = 0
    for t, on in enumerate(enable):
        if not on:
            continue
        a_j, b_j = a[j * r:(j + 1) * r], b[j * heads * d:(j + 1) * heads * d]
        for h in range(heads):
            rows = slice(h * n * d + t * d, h * n * d + (t + 1) * d)
            delta[rows] = b_j[h * d:(h + 1) * d] @ a_j * scaling
        j += 1
    return delta


def tiny_neox(seed=0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, vocab_size=100, max_position_embeddings=64)).eval()


def tiny_phi3(seed=0):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    return Phi3ForCausalLM(Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, vocab_size=100, max_position_embeddings=64,
                                      pad_token_id=0)).eval()


def gpt2_config(**kw):
    return lorakit.LoraConfig(r=2, lora_alpha=8, target_modules=["c_attn", "c_proj"], init_lora_weights=False,
                              fused_slices={"c_attn": ENABLE}, **kw)


def test_gpt2_q_and_v_only_matches_the_naive_formula(ids):
    model = lorakit.inject(tiny_gpt2(), gpt2_config())
    hosts = dict(lora_layers(model))
    attn = hosts["transformer.h.0.attn.c_attn"]
    adapter = attn.lora["default"]
    assert isinstance(adapter, SlicedAdapter)
    assert type(hosts["transformer.h.0.attn.c_proj"].lora["default"]).__name__ == "LoraAdapter"  # plain LoRA
    assert tuple(adapter.lora_A.shape) == (4, 32) and tuple(adapter.lora_B.shape) == (64, 2)
    expected = naive_delta(adapter.lora_A.detach(), adapter.lora_B.detach(), 96, ENABLE, 2, 4.0)
    torch.testing.assert_close(adapter.delta_2d(), expected)
    assert expected[32:64].abs().sum() == 0  # k untouched
    x = torch.randn(3, 5, 32)
    base = attn.base_layer
    torch.testing.assert_close(attn(x), base(x) + x @ expected.T)
    assert torch.equal(attn(x)[..., 32:64], base(x)[..., 32:64])


def test_merge_is_exact_idempotent_and_unloads_to_conv1d(ids):
    model = lorakit.inject(tiny_gpt2(), gpt2_config())
    with torch.no_grad():
        y = model(ids).logits
        lorakit.merge(model)
        lorakit.merge(model)
        torch.testing.assert_close(model(ids).logits, y, rtol=1e-5, atol=1e-5)
        lorakit.unmerge(model)
        torch.testing.assert_close(model(ids).logits, y, rtol=1e-5, atol=1e-5)
        plain = lorakit.merge_and_unload(model)
        assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
        torch.testing.assert_close(plain(ids).logits, y, rtol=1e-5, atol=1e-5)


def test_training_updates_only_the_slice_factors(ids):
    model = lorakit.inject(tiny_gpt2(), gpt2_config(lora_dropout=0.1)).train()
    model(ids, labels=ids).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora." in n for n in trainable)
    adapter = dict(lora_layers(model))["transformer.h.0.attn.c_attn"].lora["default"]
    assert adapter.lora_A.grad is not None and adapter.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["gpt2", "phi3", "neox"])
def test_peft_loads_the_full_width_file_with_identical_outputs(family, tmp_path, ids):
    peft = pytest.importorskip("peft", reason="PEFT is the reference for the adapter format")
    make, name, heads = {"gpt2": (tiny_gpt2, "c_attn", 1), "phi3": (tiny_phi3, "qkv_proj", 1),
                         "neox": (tiny_neox, "query_key_value", 4)}[family]
    spec = ENABLE if heads == 1 else {"enable": ENABLE, "heads": heads}
    cfg = lorakit.LoraConfig(r=2, lora_alpha=8, target_modules=[name], init_lora_weights=False,
                             fused_slices={name: spec})
    model = lorakit.inject(make(), cfg)
    with torch.no_grad():
        expected = model(ids).logits
    for _, host in lora_layers(model):
        ad = host.lora["default"]
        fan_out = ad.fan_out
        torch.testing.assert_close(ad.delta_2d(), naive_delta(ad.lora_A.detach(), ad.lora_B.detach(), fan_out,
                                                              ENABLE, 2, 4.0, heads))
    lorakit.save_adapter(model, tmp_path / "a")
    with pytest.warns(UserWarning, match="fused_slices"), torch.no_grad():
        got = peft.PeftModel.from_pretrained(make(), str(tmp_path / "a")).eval()(ids).logits
    torch.testing.assert_close(got, expected)
    again = lorakit.load_adapter(make(), tmp_path / "a")
    for (_, h1), (_, h2) in zip(lora_layers(model), lora_layers(again)):
        a1, a2 = h1.lora["default"], h2.lora["default"]
        assert isinstance(a2, SlicedAdapter) and torch.equal(a1.lora_A, a2.lora_A) and torch.equal(a1.lora_B, a2.lora_B)


def test_bad_fused_slices_are_config_errors_naming_the_fix():
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = lorakit.LoraConfig(target_modules=["c_attn"], fused_slices={"c_attn": [True, False, True, False, True]})
    with pytest.raises(ConfigError, match="c_attn.*5 entries.*does not divide the 96 outputs"):
        lorakit.inject(model, bad)
    assert model_state(model) is None and not list(lora_layers(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="not among target_modules"):
        lorakit.LoraConfig(target_modules=["c_proj"], fused_slices={"c_attn": ENABLE})
    with pytest.raises(ConfigError, match="adapts no slice"):
        lorakit.LoraConfig(target_modules=["c_attn"], fused_slices={"c_attn": [False, False, False]})
    with pytest.raises(ConfigError, match="list of booleans"):
        lorakit.LoraConfig(target_modules=["c_attn"], fused_slices={"c_attn": [1, 0, 1]})
    with pytest.raises(ConfigError, match="heads"):
        lorakit.LoraConfig(target_modules=["c_attn"], fused_slices={"c_attn": {"enable": ENABLE, "heads": 0}})
