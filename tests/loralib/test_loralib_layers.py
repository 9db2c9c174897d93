"""lorakit.loralib's layers and helpers against a naive restatement of loralib's maths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit.loralib as lora
from lorakit.errors import ConfigError

from .naive_loralib import NaiveEmbedding, NaiveLinear, NaiveMergedLinear, naive_lora_state_dict


def _x(*shape, seed=3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear_keeps_loralibs_keys_and_matches_its_formula(fan_in_fan_out):
    torch.manual_seed(0)
    layer = lora.Linear(8, 6, r=2, lora_alpha=4, fan_in_fan_out=fan_in_fan_out)
    sd = layer.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "weight": (8, 6) if fan_in_fan_out else (6, 8), "bias": (6,), "lora_A": (2, 8), "lora_B": (6, 2)}
    assert layer.r == 2 and layer.lora_alpha == 4 and layer.scaling == 2.0 and not layer.merged
    assert layer.in_features == 8 and layer.out_features == 6
    # a loralib state (naive reference, B ≠ 0) loads strictly and gives loralib's output
    ref = NaiveLinear(sd["weight"], sd["bias"], 2, 4, fan_in_fan_out=fan_in_fan_out)
    layer.load_state_dict(ref.state_dict(), strict=True)
    x = _x(5, 8)
    torch.testing.assert_close(layer(x), ref(x))


def test_init_is_what_loralib_does_not_what_its_comments_say():
    torch.manual_seed(0)
    lin, emb = lora.Linear(8, 6, r=2), lora.Embedding(10, 4, r=2)
    assert lin.lora_B.abs().sum() == 0 and lin.lora_A.abs().sum() > 0  # B = 0, A Kaiming (paper §4.1)
    assert emb.lora_A.abs().sum() == 0 and emb.lora_B.abs().sum() > 0  # Embedding: A = 0, B ~ N(0, 1)
    assert not lin.weight.requires_grad and lin.lora_A.requires_grad


def test_eval_does_not_merge_and_explicit_merge_is_exact_and_idempotent():
    torch.manual_seed(0)
    layer = lora.Linear(8, 6, r=2, lora_alpha=4)
    nn.init.normal_(layer.lora_B)
    w0 = layer.weight.detach().clone()
    x = _x(5, 8)
    y = layer(x)
    layer.eval()
    assert torch.equal(layer.weight, w0) and not layer.merged  # loralib would merge here
    layer.merge()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.weight - w0, layer.lora_B @ layer.lora_A * 2.0)
    torch.testing.assert_close(layer(x), y)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0)
    assert not layer.merged


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merged_linear_adapts_only_the_enabled_slices(fan_in_fan_out):
    torch.manual_seed(0)
    layer = lora.MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=[True, False, True],
                              fan_in_fan_out=fan_in_fan_out)
    sd = layer.state_dict()
    assert tuple(sd["lora_A"].shape) == (4, 8) and tuple(sd["lora_B"].shape) == (8, 2)
    ref = NaiveMergedLinear(sd["weight"], sd["bias"], 2, 4, [True, False, True], fan_in_fan_out=fan_in_fan_out)
    layer.load_state_dict(ref.state_dict(), strict=True)
    x = _x(5, 8)
    torch.testing.assert_close(layer(x), ref(x))
    delta = layer.delta_weight()
    delta = delta.T if fan_in_fan_out else delta
    assert delta[4:8].abs().sum() == 0 and delta[:4].abs().sum() > 0  # k rows untouched
    torch.testing.assert_close(delta, ref.delta())
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.weight.grad is None


def test_embedding_matches_loralib():
    torch.manual_seed(0)
    layer = lora.Embedding(10, 4, r=2, lora_alpha=3, padding_idx=0)
    ref = NaiveEmbedding(layer.weight, 2, 3)
    layer.load_state_dict(ref.state_dict(), strict=True)
    ids = torch.tensor([[1, 2, 9], [0, 3, 3]])
    torch.testing.assert_close(layer(ids), ref(ids))


def test_conv2d_uses_peft_factors_with_the_dense_formula():
    torch.manual_seed(0)
    layer = lora.Conv2d(3, 5, 3, r=2, lora_alpha=4, padding=1)
    nn.init.normal_(layer.lora_B)
    assert tuple(layer.lora_A.shape) == (2, 3, 3, 3) and tuple(layer.lora_B.shape) == (5, 2, 1, 1)
    x = _x(2, 3, 6, 6)
    w = layer.weight + (layer.lora_B.flatten(1) @ layer.lora_A.flatten(1)).view(layer.weight.shape) * 2.0
    torch.testing.assert_close(layer(x), F.conv2d(x, w, layer.bias, padding=1))
    assert layer.conv is layer.host.base_layer and layer.kernel_size == (3, 3)


def test_dtype_move_keeps_layer_working():
    torch.manual_seed(0)
    layer = lora.MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=[False, True, True]).double()
    nn.init.normal_(layer.lora_B)
    x = _x(3, 8).double()
    assert layer(x).dtype == torch.float64
    ref = NaiveMergedLinear(layer.weight.float(), layer.bias.float(), 2, 4, [False, True, True])
    ref.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    torch.testing.assert_close(layer(x).float(), ref(x.float()), rtol=1e-5, atol=1e-5)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = lora.Embedding(10, 8, r=2)
        self.q = lora.Linear(8, 8, r=2)
        self.k = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_helpers_agree_with_loralib_on_a_loralib_model(bias):
    net = _Net()
    lora.mark_only_lora_as_trainable(net, bias=bias)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    expected = {"emb.lora_A", "emb.lora_B", "q.lora_A", "q.lora_B"}
    expected |= {"all": {"q.bias", "k.bias", "ln.bias"}, "lora_only": {"q.bias"}, "none": set()}[bias]
    assert trainable == expected
    assert set(lora.lora_state_dict(net, bias=bias)) == set(naive_lora_state_dict(net, bias=bias))


def test_bad_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="does not divide"):
        lora.MergedLinear(8, 10, r=2, enable_lora=[True, False, True])
    with pytest.raises(ConfigError, match="bias='some'"):
        lora.mark_only_lora_as_trainable(_Net(), bias="some")
    with pytest.raises(ConfigError, match="rank"):
        lora.Linear(4, 4, r=-1)
    layer = lora.Linear(4, 4, r=2)
    layer.merge()
    with pytest.raises(ConfigError, match="unmerge"):
        layer.scaling = 3.0


def test_rank_zero_and_deepcopy():
    import copy

    plain = lora.Linear(4, 3, r=0)
    assert set(plain.state_dict()) == {"weight", "bias"} and plain.scaling == 0.0
    x = _x(2, 4)
    torch.testing.assert_close(plain(x), F.linear(x, plain.weight, plain.bias))
    layer = lora.MergedLinear(8, 12, r=2, enable_lora=[True, False, True])
    nn.init.normal_(layer.lora_B)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.lora_B.mul_(0)
    assert torch.equal(twin(_x(2, 8)), F.linear(_x(2, 8), twin.weight, twin.bias))  # the copy's own tensors
    assert layer.lora_B.abs().sum() > 0


def test_only_plain_lora_pairs_export_to_a_loralib_checkpoint():
    import lorakit
    from lorakit.adapter_kinds.adalora_config import AdaLoraConfig
    from lorakit.errors import UnsupportedModuleError

    from conftest import tiny_gpt2

    model = lorakit.inject(tiny_gpt2(), AdaLoraConfig(target_modules=["c_attn"], total_step=10))
    with pytest.raises(UnsupportedModuleError, match="lorakit.save_adapter"):
        lora.lora_state_dict(model)
