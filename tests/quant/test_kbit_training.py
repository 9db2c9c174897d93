"""prepare_for_kbit_training and one QLoRA run end to end on a tiny model."""

from __future__ import annotations

import pytest
import torch
from qhelpers import one_thread  # noqa: F401  (fixture)
from torch import nn

import lorakit
from lorakit.errors import ConfigError
from lorakit.quant import Adam8bit, prepare_for_kbit_training, quantize_model

from conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _qmodel():
    model = tiny_llama().to(torch.bfloat16)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untied head
    return quantize_model(model)


def test_norms_upcast_head_and_embeddings_not():
    model = prepare_for_kbit_training(_qmodel())
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())
    assert model.is_gradient_checkpointing and model.config.use_cache is False


def test_upcast_head_on_request_and_switches():
    model = prepare_for_kbit_training(_qmodel(), gradient_checkpointing=False, upcast_norms=False, upcast_head=True)
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert not model.is_gradient_checkpointing


def test_plain_module_needs_checkpointing_off():
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ConfigError, match="gradient_checkpointing=False"):
        prepare_for_kbit_training(net)
    prepare_for_kbit_training(net, gradient_checkpointing=False)
    assert net[1].weight.dtype == torch.float32


def test_qlora_training_steps_reduce_the_loss(ids):
    torch.manual_seed(0)
    model = prepare_for_kbit_training(_qmodel())
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = Adam8bit(params, lr=5e-3, min_8bit_size=0)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
