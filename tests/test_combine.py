"""Combining adapters, checked against dense sums of the inputs' ΔW computed here by hand."""

import pytest
import torch

import lorakit
from lorakit.state import lora_layers

from conftest import tiny_llama


def setup(rslora=False):
    m = tiny_llama()
    for name, r, alpha in (("x", 4, 8), ("y", 4, 3)):
        lorakit.inject(m, lorakit.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False, use_rslora=rslora), name)
    return m


def naive_delta(host, name):
    ad = host.lora[name]
    return ad.scaling * ad.lora_B.detach() @ ad.lora_A.detach()


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_one_adapter_weight_one_reproduces_it(method, rslora, ids):
    m = setup(rslora)
    lorakit.combine_adapters(m, ["x"], [1.0], "c", method=method)
    for _, host in lora_layers(m):
        got, want = naive_delta(host, "c"), naive_delta(host, "x")
        if method == "svd":
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(got, want)
            assert torch.equal(host.lora["c"].lora_A, host.lora["x"].lora_A)
    # and through a save/load round trip the scaling survives (rsLoRA included)
    with torch.no_grad():
        lorakit.set_adapter(m, "x")
        yx = m(ids).logits
        lorakit.set_adapter(m, "c")
        torch.testing.assert_close(m(ids).logits, yx, rtol=1e-4, atol=1e-5)


def test_cat_is_exact_weighted_sum():
    m = setup()
    lorakit.combine_adapters(m, ["x", "y"], [0.7, -1.3], "c", method="cat")
    for _, host in lora_layers(m):
        want = 0.7 * naive_delta(host, "x") - 1.3 * naive_delta(host, "y")
        torch.testing.assert_close(naive_delta(host, "c"), want, rtol=1e-5, atol=1e-6)
        assert host.lora["c"].r == 8


def test_svd_is_best_rank_k_of_the_sum():
    m = setup()
    lorakit.combine_adapters(m, ["x", "y"], [1.0, 1.0], "c", method="svd", svd_rank=3)
    for _, host in lora_layers(m):
        dense = naive_delta(host, "x") + naive_delta(host, "y")
        s = torch.linalg.svdvals(dense)
        err = torch.linalg.matrix_norm(naive_delta(host, "c") - dense)
        torch.testing.assert_close(err, s[3:].square().sum().sqrt(), rtol=1e-3, atol=1e-5)


def test_linear_matches_peft_add_weighted_adapter(tmp_path, ids):
    """combination_type="linear" against PEFT's own add_weighted_adapter on the same two adapters."""
    peft = pytest.importorskip("peft")
    m = setup()
    w = [0.5, 2.0]
    for name in ("x", "y"):
        lorakit.save_adapter(m, tmp_path / name, name)
    lorakit.combine_adapters(m, ["x", "y"], w, "c", method="linear")
    lorakit.set_adapter(m, "c")
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "x", adapter_name="x")
    pm.load_adapter(tmp_path / "y", adapter_name="y")
    pm.add_weighted_adapter(["x", "y"], w, "c", combination_type="linear")
    pm.set_adapter("c")
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, pm(ids).logits, rtol=1e-5, atol=1e-5)
    for path, host in lora_layers(m):  # and the update itself, layer by layer
        want = pm.base_model.model.get_submodule(path).get_delta_weight("c")
        torch.testing.assert_close(naive_delta(host, "c"), want.detach(), rtol=1e-5, atol=1e-6)


def test_bad_combine_inputs():
    m = setup()
    with pytest.raises(lorakit.LorakitError, match="one weight per adapter"):
        lorakit.combine_adapters(m, ["x", "y"], [1.0], "c")
    with pytest.raises(lorakit.LorakitError, match="combine method 'avg'"):
        lorakit.combine_adapters(m, ["x"], [1.0], "c", method="avg")
    lorakit.inject(m, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), "z")
    with pytest.raises(lorakit.LorakitError, match="linear' needs every adapter"):
        lorakit.combine_adapters(m, ["x", "z"], [1.0, 1.0], "c", method="linear")
