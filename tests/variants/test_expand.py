"""LLaMA-Pro block expansion: exact identity (forward, KV-cache generation, reload), training only
the new blocks, and the errors for bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.errors import AdapterStateError, ConfigError, LorakitError, UnsupportedModuleError
from lorakit.layers.host import LoraLayer
from lorakit.variants.expand import expand_blocks, expansion_plan, lora_config_for_new_blocks

from conftest import tiny_gpt2, tiny_llama


def _qwen2_sliding():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      use_sliding_window=True, sliding_window=4, max_window_layers=2)
    return Qwen2ForCausalLM(cfg).eval()


MODELS = {"llama": lambda: tiny_llama(layers=4), "gpt2": tiny_gpt2, "qwen2": _qwen2_sliding}


def _blocks(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def test_plan_inserts_a_copy_after_each_group():
    assert expansion_plan(4, 2) == [(0, False), (1, False), (1, True), (2, False), (3, False), (3, True)]
    assert [c for _, c in expansion_plan(6, 3)] == [False, False, True] * 3
    assert expansion_plan(2, 2) == [(0, False), (0, True), (1, False), (1, True)]


@pytest.mark.parametrize("family", sorted(MODELS))
def test_expanded_model_is_exactly_the_original(family, ids, tmp_path):
    model = MODELS[family]()
    n = len(_blocks(model))
    with torch.no_grad():
        ref = model(ids).logits
        ref_gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                 pad_token_id=0)
    new = expand_blocks(model, 2)
    blocks = _blocks(model)
    assert len(blocks) == n + 2 == model.config.num_hidden_layers
    assert new == [n // 2, n + 1]
    # every attention module knows its new slot in the KV cache
    for i, block in enumerate(blocks):
        assert all(m.layer_idx == i for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             pad_token_id=0)
    assert torch.equal(gen, ref_gen)  # generation runs through the KV cache
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.num_hidden_layers == n + 2
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref)


def test_gpt2_n_layer_and_qwen2_layer_types_follow():
    gpt2 = tiny_gpt2()
    expand_blocks(gpt2, 1)
    assert gpt2.config.n_layer == 3
    qwen = _qwen2_sliding()
    before = list(qwen.config.layer_types)
    expand_blocks(qwen, 2)
    assert qwen.config.layer_types == [before[0], before[1], before[1], before[2], before[3], before[3]]


def test_copies_keep_norms_and_zero_only_the_output_projections():
    model = tiny_gpt2()
    expand_blocks(model, 1)
    src, copy = model.transformer.h[1], model.transformer.h[2]
    assert torch.equal(copy.ln_1.weight, src.ln_1.weight) and torch.equal(copy.attn.c_attn.weight, src.attn.c_attn.weight)
    for m in (copy.attn.c_proj, copy.mlp.c_proj):
        assert not m.weight.any() and not m.bias.any()
    assert copy.attn.c_attn.weight.data_ptr() != src.attn.c_attn.weight.data_ptr()  # a copy, not shared


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_only_new_blocks_train_and_they_get_gradients(family, ids):
    model = MODELS[family]()
    new = expand_blocks(model, 2)
    blocks = _blocks(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prefix = "model.layers" if family == "llama" else "transformer.h"
    assert trainable and all(any(n.startswith(f"{prefix}.{i}.") for i in new) for n in trainable)
    model.train()
    model(ids, labels=ids).loss.backward()
    out_proj = blocks[new[0]].self_attn.o_proj if family == "llama" else blocks[new[0]].attn.c_proj
    assert out_proj.weight.grad is not None and out_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for i, b in enumerate(blocks) if i not in new for p in b.parameters())


def test_lora_restricted_to_new_blocks(ids):
    model = tiny_llama(layers=4)
    new = expand_blocks(model, 2)
    with torch.no_grad():
        ref = model(ids).logits
    lorakit.inject(model, lora_config_for_new_blocks(new, r=2))
    adapted = {p.split(".")[2] for p, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == {str(i) for i in new}
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)  # B = 0: still the original function


def test_bad_counts_and_unknown_architectures():
    model = tiny_llama(layers=4)
    with pytest.raises(ConfigError, match=r"choose n_new among \[1, 2, 4\]"):
        expand_blocks(model, 3)
    with pytest.raises(ConfigError, match="integer >= 1"):
        expand_blocks(model, 0)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    with pytest.raises(UnsupportedModuleError, match="blocks='path.to.layers'") as err:
        expand_blocks(Odd(), 1)
    assert isinstance(err.value, LorakitError)
    with pytest.raises(UnsupportedModuleError, match="not a non-empty ModuleList"):
        expand_blocks(Odd(), 1, blocks="stack", outputs=("out_proj",))


def test_custom_layout_and_refusals():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList([Block() for _ in range(2)])

        def forward(self, x):
            for b in self.stack:
                x = b(x)
            return x

    net, x = Net(), torch.randn(3, 4)
    ref = net(x)
    assert expand_blocks(net, 2, blocks="stack", outputs=("fc2",)) == [1, 3]
    assert torch.equal(net(x), ref)

    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterStateError, match="expand the plain model first"):
        expand_blocks(model, 1)
    gpt2 = tiny_gpt2()
    gpt2.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(UnsupportedModuleError, match="scale_attn_by_inverse_layer_idx"):
        expand_blocks(gpt2, 1)
