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


def test_dropout_only_on_branch_and_shared_between_readers():
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(16, 16)
            self.k = nn.Linear(16, 16)

        def forward(self, x):
            return self.q(x), self.k(x)

    m = Two()
    lorakit.inject(m, lorakit.LoraConfig(r=4, lora_alpha=4, lora_dropout=0.5, target_modules=["q", "k"],
                                         init_lora_weights=False))
    m.train()
    x = torch.randn(3, 16)
    q, k = m(x)
    from lorakit.layers import dropout as dmod

    mask = dmod.shared_mask(x, 0.5)  # the cached mask both projections used
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    xd = x * mask
    for host, out in ((m.q, q), (m.k, k)):
        ad = host.lora["default"]
        ref = host.base_layer(x) + (xd @ ad.lora_A.T) @ ad.lora_B.T  # clean x on the base path
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert dmod.shared_mask(x, 0.5) is mask
    assert not torch.equal(dmod.shared_mask(x.clone(), 0.5), mask)  # another tensor, another mask
    m.eval()
    ad = m.q.lora["default"]
    torch.testing.assert_close(m(x)[0], m.q.base_layer(x) + (x @ ad.lora_A.T) @ ad.lora_B.T)


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


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_dropout_mask_rate_lanes_and_unbiased(p):
    from lorakit.layers.dropout import keep_mask, shared_mask

    torch.manual_seed(0)
    n = 400_000
    keep, scale = keep_mask(torch.Size([n]), p, "cpu")
    sigma = (p * (1 - p) / (n / 4)) ** 0.5
    for lane in range(4):  # each 16-bit lane of the random words keeps at the same rate
        rate = 1 - keep[lane::4].float().mean().item()
        assert abs(rate - p) < 5 * sigma, (lane, rate)
    # neighbouring lanes are independent: P(both dropped) ≈ p²
    both = (~keep[0::4] & ~keep[1::4]).float().mean().item()
    assert abs(both - p * p) < 5 * (p * p / (n / 4)) ** 0.5 + 1e-3
    mask = shared_mask(torch.ones(n), p)
    assert abs(mask.mean().item() - 1.0) < 0.01  # kept elements are scaled by 1/(1-p̃): unbiased
    assert abs(1 / mask.max().item() - (1 - p)) < 1e-5


def test_dropout_branch_gradients_match_autograd_reference():
    torch.manual_seed(0)
    model = Holder(nn.Linear(12, 6))
    lorakit.inject(model, lorakit.LoraConfig(r=3, lora_alpha=6, lora_dropout=0.3, target_modules=["layer"],
                                             init_lora_weights=False))
    model.train()
    x = torch.randn(4, 5, 12, requires_grad=True)
    y = model(x)
    from lorakit.layers.dropout import shared_mask

    mask = shared_mask(x, 0.3)
    ad = model.layer.lora["default"]
    a = ad.lora_A.detach().clone().requires_grad_(True)
    b = ad.lora_B.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    lin = model.layer.base_layer
    ref = lin(xr) + 2.0 * ((xr * mask) @ a.T) @ b.T
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ad.lora_A.grad, a.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ad.lora_B.grad, b.grad, rtol=1e-4, atol=1e-5)
