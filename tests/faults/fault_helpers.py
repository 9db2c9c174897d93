"""What "the model is exactly as it was" means in the fault tests: an independent picture of a model."""

from __future__ import annotations

import torch

import lorakit


def picture(model: torch.nn.Module) -> dict:
    """State dict (values cloned), module tree (path → class), requires_grad, adapter lists."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "tree": [(p, type(m).__name__) for p, m in model.named_modules()],
        "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "adapters": lorakit.list_adapters(model),
        "active": lorakit.active_adapters(model),
    }


def assert_same(before: dict, after: dict) -> None:
    assert after["tree"] == before["tree"]
    assert after["grad"] == before["grad"]
    assert after["adapters"] == before["adapters"]
    assert after["active"] == before["active"]
    assert list(after["state"]) == list(before["state"])
    for k, v in before["state"].items():
        w = after["state"][k]
        assert w.dtype == v.dtype and w.shape == v.shape and torch.equal(w, v), k


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()
