"""Each base kind against a naive reference: y = base with W' = W + s·B·A, written out by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.layers.host import LoraLayer


class Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _wrap(layer, r=4, alpha=8, rslora=False):
    model = Holder(layer)
    cfg = lorakit.LoraConfig(r=r, lora_alpha=alpha, target_modules=["layer"], init_lora_weights=False,
                             use_rslora=rslora)
    lorakit.inject(model, cfg)
    host = model.layer
    assert isinstance(host, LoraLayer)
    ad = host.lora["default"]
    return model, host, ad


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_matches_naive(rslora):
    torch.manual_seed(0)
    lin = nn.Linear(12, 10)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    model, host, ad = _wrap(lin, r=4, alpha=8, rslora=rslora)
    s = 8 / 4 ** 0.5 if rslora else 8 / 4
    x = torch.randn(3, 5, 12, requires_grad=True)
    y = model(x)
    a = ad.lora_A.detach().clone().requires_grad_(True)
    b = ad.lora_B.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, w0 + s * (b @ a), b0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ad.lora_A.grad, a.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ad.lora_B.grad, b.grad, rtol=1e-4, atol=1e-5)
    assert lin.weight.grad is None  # frozen base


def test_gpt2_conv1d_matches_naive():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(10, 12)  # nf=10 outputs, nx=12 inputs; weight (12, 10)
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    model, host, ad = _wrap(conv)
    x = torch.randn(2, 4, 12)
    ref = x @ (w0 + 2.0 * (ad.lora_B @ ad.lora_A).T) + b0
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_embedding_matches_naive():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 6, padding_idx=0)
    w0 = emb.weight.detach().clone()
    model, host, ad = _wrap(emb)
    assert ad.lora_A.shape == (4, 20) and ad.lora_B.shape == (6, 4)
    ids = torch.randint(0, 20, (3, 7))
    ref = F.embedding(ids, w0 + 2.0 * (ad.lora_B @ ad.lora_A).T)
    torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", [1, 2])
def test_conv_matches_naive(dim):
    torch.manual_seed(0)
    conv = (nn.Conv1d if dim == 1 else nn.Conv2d)(3, 5, kernel_size=3, stride=2, padding=1)
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    model, host, ad = _wrap(conv)
    x = torch.randn(2, 3, *([9] * dim))
    delta = (ad.lora_B.flatten(1) @ ad.lora_A.flatten(1)).reshape(w0.shape) * 2.0
    fn = F.conv1d if dim == 1 else F.conv2d
    ref = fn(x, w0 + delta, b0, stride=2, padding=1)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_default_init_is_identity_and_b_zero():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    model = Holder(lin)
    x = torch.randn(4, 8)
    ref = lin(x)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["layer"]))
    ad = model.layer.lora["default"]
    assert torch.count_nonzero(ad.lora_B) == 0 and torch.count_nonzero(ad.lora_A) > 0
    assert torch.equal(model(x), ref)  # B = 0 ⇒ identical output


def test_gaussian_init_std():
    torch.manual_seed(0)
    model = Holder(nn.Linear(4096, 8))
    lorakit.inject(model, lorakit.LoraConfig(r=8, target_modules=["layer"], init_lora_weights="gaussian"))
    a = model.layer.lora["default"].lora_A
    assert abs(a.std().item() - 1 / 8) < 0.01


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    model = Holder(nn.Linear(16, 8))
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["layer"], init_lora_weights=False))
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    ad = model.layer.lora["default"]
    assert ad.lora_A.grad.dtype == torch.float32 and ad.lora_B.grad.dtype == torch.float32
    ref = model(x)
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)
