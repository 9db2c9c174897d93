"""Lifecycle: several adapters, activation, disabling, merge/unmerge, unload, per-row selection."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import AdapterNotFoundError, AdapterStateError

from conftest import tiny_gpt2, tiny_llama


def two_adapters(model_fn=tiny_llama):
    m = model_fn()
    lorakit.inject(m, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False), "a")
    lorakit.inject(m, lorakit.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"] if model_fn is tiny_llama
                                         else ["c_attn"], init_lora_weights=False), "b")
    return m


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gpt2])
def test_merged_equals_unmerged_and_idempotent(model_fn, ids):
    m = two_adapters(model_fn)
    lorakit.set_adapter(m, ["a", "b"])
    base = m.get_output_embeddings()
    with torch.no_grad():
        y = m(ids).logits
        w_before = {n: p.clone() for n, p in m.named_parameters() if "base_layer" in n}
        lorakit.merge(m)
        torch.testing.assert_close(m(ids).logits, y, rtol=1e-5, atol=1e-5)
        w_once = {n: p.clone() for n, p in m.named_parameters() if "base_layer" in n}
        lorakit.merge(m)  # merge twice = once
        assert all(torch.equal(w_once[n], p) for n, p in m.named_parameters() if "base_layer" in n)
        lorakit.unmerge(m)
        for n, p in m.named_parameters():
            if "base_layer" in n:
                torch.testing.assert_close(p, w_before[n], rtol=0, atol=1e-6)
    assert base is m.get_output_embeddings()


def test_merge_and_unload_returns_plain_classes(ids):
    m = two_adapters()
    with torch.no_grad():
        y = m(ids).logits
    cls = type(m)
    plain = lorakit.merge_and_unload(m)
    assert type(plain) is cls
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not any("lorakit" in type(mod).__module__ for mod in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, y, rtol=1e-5, atol=1e-5)
    assert lorakit.list_adapters(plain) == []


def test_unload_restores_base(ids):
    ref = tiny_llama()
    with torch.no_grad():
        y0 = ref(ids).logits
    m = two_adapters()
    lorakit.merge(m)
    plain = lorakit.unload(m)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, y0, rtol=1e-5, atol=1e-5)


def test_active_sum_disable_and_delete(ids):
    m = two_adapters()
    with torch.no_grad():
        lorakit.set_adapter(m, "a")
        ya = m(ids).logits
        with lorakit.disabled(m):
            y0 = m(ids).logits
        lorakit.set_adapter(m, ["a", "b"])
        yab = m(ids).logits
        assert not torch.allclose(ya, yab)
        # disabled is exception-safe and sees the base even when merged
        lorakit.merge(m)
        with pytest.raises(RuntimeError), lorakit.disabled(m):
            torch.testing.assert_close(m(ids).logits, y0)
            raise RuntimeError("boom")
        torch.testing.assert_close(m(ids).logits, yab, rtol=1e-5, atol=1e-5)
        lorakit.unmerge(m)
        lorakit.delete_adapter(m, "b")
        assert lorakit.list_adapters(m) == ["a"] and lorakit.active_adapters(m) == ["a"]
        torch.testing.assert_close(m(ids).logits, ya, rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterNotFoundError, match="no adapter named 'zz'"):
        lorakit.set_adapter(m, "zz")


def test_only_active_trainable_adapter_gets_grads(ids):
    m = two_adapters()
    lorakit.set_trainable(m, "a", False)
    lorakit.set_adapter(m, ["a", "b"])
    m(ids).logits.sum().backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None}
    assert grads and all(".lora.b." in n for n in grads)


def test_per_row_adapters_match_single_adapter_runs(ids):
    m = two_adapters()
    with torch.no_grad():
        outs = {}
        for name in ("a", "b"):
            lorakit.set_adapter(m, name)
            outs[name] = m(ids).logits
        with lorakit.disabled(m):
            outs[None] = m(ids).logits
        batch = torch.cat([ids, ids, ids])  # rows: 0,1 -> a; 2,3 -> None; 4,5 -> b
        names = ["a", "a", None, None, "b", "b"]
        with lorakit.per_row_adapters(m, names):
            y = m(batch).logits
    torch.testing.assert_close(y[0:2], outs["a"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[2:4], outs[None], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[4:6], outs["b"], rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterStateError, match="one name"), lorakit.per_row_adapters(m, ["a"]), torch.no_grad():
        m(batch)


def test_safe_merge_refuses_non_finite(ids):
    m = two_adapters()
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.lora["a"].lora_B.fill_(float("inf"))
    w = m.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    lorakit.set_adapter(m, "a")
    with pytest.raises(AdapterStateError, match="inf/NaN"):
        lorakit.merge(m, safe_merge=True)
    assert torch.equal(m.model.layers[0].self_attn.q_proj.base_layer.weight, w)


def test_eval_does_not_merge(ids):
    """``.eval()`` / ``.train()`` never merge (loralib merged on ``.eval()``): the base weights stay
    bit-identical and the output is base + s·B·A computed here by hand from an untouched copy."""
    import copy

    m = two_adapters()
    lorakit.set_adapter(m, "a")
    plain = lorakit.unload(copy.deepcopy(m))  # the base model, weights as they were
    weights = {n: p.clone() for n, p in m.named_parameters() if "base_layer" in n}
    m.train()
    m.eval()
    assert all(torch.equal(weights[n], p) for n, p in m.named_parameters() if "base_layer" in n)
    with torch.no_grad():
        for path, host in lorakit.state.lora_layers(m):  # merge by hand into the plain copy
            ad = host.lora["a"]
            plain.get_submodule(path).weight += ad.scaling * ad.lora_B @ ad.lora_A
        torch.testing.assert_close(m(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(weights[n], p) for n, p in m.named_parameters() if "base_layer" in n)
