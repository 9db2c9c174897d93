"""LoHa and LoKr deltas and forwards against PEFT's LoHa/LoKr and against naive formulas in the test."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.adapter_kinds.loha import LoHaAdapter
from lorakit.adapter_kinds.lokr import LoKrAdapter, factorization
from lorakit.layers.kinds import kind_of

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(12, 18)
        self.conv = nn.Conv2d(8, 12, 3, padding=1)

    def forward(self, x, img):
        return self.lin(x), self.conv(img)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 12, generator=g), torch.randn(2, 8, 5, 5, generator=g)


def _copy_from_peft(adapter, layer, names):
    with torch.no_grad():
        for suffix, p in adapter.peft_tensors().items():
            p.copy_(getattr(layer, suffix)["default"].reshape(p.shape))


def test_factorization_matches_lycoris_rule():
    from peft.tuners.lokr.layer import factorization as ref

    for dim in list(range(1, 200)) + [320, 640, 768, 1280, 2048]:
        for factor in (-1, 2, 4, 8, 16):
            assert factorization(dim, factor) == ref(dim, factor), (dim, factor)
    assert factorization(256) == (16, 16) and factorization(128, 4) == (4, 32)


def test_loha_matches_peft_and_the_formula():
    net = Net()
    x, img = _inputs()
    base_lin, base_conv = net(x, img)
    model = peft.get_peft_model(Net(), peft.LoHaConfig(r=3, alpha=5, target_modules=["lin", "conv"], init_weights=False))
    want_lin, want_conv = model(x, img)
    for name, base in (("lin", net.lin), ("conv", net.conv)):
        layer = model.base_model.model.get_submodule(name)
        ad = LoHaAdapter(base, r=3, alpha=5)
        _copy_from_peft(ad, layer, None)
        ref = layer.get_delta_weight("default")
        assert torch.allclose(ad.delta_2d().reshape(ref.shape), ref, atol=1e-6)
        # independent formula, entry by entry: ΔW_ij = α/r Σ_p w1a_ip w1b_pj · Σ_q w2a_iq w2b_qj
        w1a, w1b, w2a, w2b = (t.detach() for t in ad.peft_tensors().values())
        naive = torch.einsum("ip,pj->ij", w1a, w1b) * torch.einsum("iq,qj->ij", w2a, w2b) * (5 / 3)
        assert torch.allclose(ad.delta_2d(), naive, atol=1e-6)
        got = ad.forward_into(kind_of(base), base, base(x if name == "lin" else img), x if name == "lin" else img)
        want = want_lin if name == "lin" else want_conv
        assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(want_lin, base_lin)


def test_loha_starts_at_zero():
    ad = LoHaAdapter(nn.Linear(4, 6), r=2, alpha=2)
    ad.reset()
    assert torch.count_nonzero(ad.delta_2d()) == 0


@pytest.mark.parametrize("r,decompose_both,factor", [(1, False, -1), (1, True, -1), (8, False, -1), (2, True, 4)])
def test_lokr_matches_peft_and_the_formula(r, decompose_both, factor):
    net = Net()
    x, img = _inputs()
    cfg = peft.LoKrConfig(r=r, alpha=3, target_modules=["lin", "conv"], init_weights=False,
                          decompose_both=decompose_both, decompose_factor=factor)
    model = peft.get_peft_model(Net(), cfg)
    want_lin, want_conv = model(x, img)
    for name, base in (("lin", net.lin), ("conv", net.conv)):
        layer = model.base_model.model.get_submodule(name)
        # PEFT always scales by α/r; lorakit's adapter takes the scale it is loaded with.
        ad = LoKrAdapter(base, r=r, alpha=3, factor=factor, decompose_both=decompose_both, scaling=3 / r)
        assert set(ad.peft_tensors()) == {k for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                                                      "lokr_w2_b") if "default" in getattr(layer, k)}
        _copy_from_peft(ad, layer, None)
        ref = layer.get_delta_weight("default")
        assert torch.allclose(ad.delta_2d().reshape(ref.shape), ref, atol=1e-6)
        # independent Kronecker product: ΔW[(a,b),(c,d,s)] = s · W1[a,c] · W2[b,d,s]
        w1, w2 = ad.w1().detach(), ad.w2().detach()
        L, M = w1.shape
        K = w2.shape[0]
        w2r = w2.reshape(K, -1, base.weight[0, 0].numel())  # (K, N, k·k)
        naive = torch.einsum("ac,bds->abcds", w1, w2r).reshape(L * K, M * w2r.shape[1] * w2r.shape[2]) * (3 / r)
        assert torch.allclose(ad.delta_2d(), naive, atol=1e-6)
        inp = x if name == "lin" else img
        got = ad.forward_into(kind_of(base), base, base(inp), inp)
        assert torch.allclose(got, want_lin if name == "lin" else want_conv, atol=1e-5)


def test_lokr_lycoris_scale_rule_both_full():
    lin = nn.Linear(12, 18)
    full = LoKrAdapter(lin, r=16, alpha=4)  # r ≥ max/2 → w2 full; w1 always full without decompose_both
    assert full.full_w1 and full.full_w2 and full.scaling == 1.0
    small = LoKrAdapter(lin, r=1, alpha=4)
    assert not small.full_w2 and small.scaling == 4.0
    ad = LoKrAdapter(lin, r=2, alpha=2)
    ad.reset()
    assert torch.count_nonzero(ad.delta_2d()) == 0
    x = torch.randn(2, 12)
    assert torch.equal(ad.forward_into(kind_of(lin), lin, lin(x), x), lin(x))
