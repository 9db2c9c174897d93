"""``nn.Module.apply(fn)`` still works on an injected model, for every adapter kind.

transformers' ``init_weights`` / ``post_init``, DeepSpeed's ``initialize`` and users' own init code call
``model.apply(fn)``: it must visit every submodule (adapters included) and run nothing else. An adapter
method named ``apply`` once shadowed it (``TypeError: apply() missing 4 required positional arguments``).
"""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.adapter_kinds.lycoris_config import LoHaConfig, LoKrConfig
from lorakit.layers.protocol import Adapter

from conftest import tiny_llama

CONFIGS = {
    "lora": lambda: lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "dora": lambda: lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
    "rslora+bias": lambda: lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                                              bias="lora_only"),
    "embedding": lambda: lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "lokr": lambda: LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_apply_visits_every_module_and_changes_nothing_else(name):
    model = tiny_llama()
    lorakit.inject(model, CONFIGS[name]())
    x = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        before = model(x).logits

    seen: list[torch.nn.Module] = []
    returned = model.apply(seen.append)

    assert returned is model
    # the same modules, in the same order, as a plain walk over the module tree
    assert [id(m) for m in seen] == [id(m) for m in _post_order(model)]
    assert sum(isinstance(m, Adapter) for m in seen) >= 2  # the adapters themselves are visited
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)


def test_an_init_function_applied_to_the_model_reaches_the_adapters():
    """``model.apply(init)`` (what ``post_init`` does) can re-initialise the adapters' factors."""
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="gaussian"))

    def fill(m):
        for p in m.parameters(recurse=False):
            torch.nn.init.constant_(p, 0.5)

    model.apply(fill)
    factors = {n: p for n, p in model.named_parameters() if ".lora." in n}
    assert len(factors) == 4  # lora_A and lora_B in both layers
    assert all(bool((p == 0.5).all()) for p in factors.values())


def _post_order(module: torch.nn.Module):
    """Children before their parent: the order ``nn.Module.apply`` visits them in."""
    for child in module.children():
        yield from _post_order(child)
    yield module
