"""Dropout on the adapter branch: PEFT's per-projection masks by default, the shared-mask option,
the mask's statistics, gradients against autograd, and redraw under gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lorakit
from lorakit.layers.dropout import SharedMasks, draw_mask, dropout_mask, keep_mask
from lorakit.layers.host import share_dropout_masks
from lorakit.layers.seeded_dropout import SeededMask


def _dense(mask):
    """The host's mask as a dense 0 / 1/(1-p) tensor (a SeededMask where the C kernel runs; its
    values are checked against an independent hash in test_seeded_dropout.py)."""
    return mask.to_dense() if isinstance(mask, SeededMask) else mask


class Two(nn.Module):
    """Two projections reading the same input (q/k of an attention block)."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.k = nn.Linear(16, 16)

    def forward(self, x):
        return self.q(x), self.k(x)


def _two(p=0.5):
    torch.manual_seed(0)
    m = Two()
    lorakit.inject(m, lorakit.LoraConfig(r=4, lora_alpha=4, lora_dropout=p, target_modules=["q", "k"],
                                         init_lora_weights=False))
    return m.train()


def _ref(host, x, mask):
    ad = host.lora["default"]
    return host.base_layer(x) + ((x * mask) @ ad.lora_A.T) @ ad.lora_B.T  # clean x on the base path


def test_default_is_an_independent_mask_per_projection():
    m = _two()
    x = torch.randn(64, 16)
    torch.manual_seed(1)
    q, k = m(x)
    torch.manual_seed(1)  # the same draws, in forward order: q's mask, then k's
    mq, mk = _dense(draw_mask(x, 0.5)), _dense(draw_mask(x, 0.5))
    assert set(mq.unique().tolist()) == {0.0, 2.0}
    assert not torch.equal(mq, mk)  # independent (PEFT's semantics)
    torch.testing.assert_close(q, _ref(m.q, x, mq), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, _ref(m.k, x, mk), rtol=1e-5, atol=1e-5)
    m.eval()  # no dropout at eval
    ones = torch.ones_like(x)
    torch.testing.assert_close(m(x)[0], _ref(m.q, x, ones))


def test_no_module_level_state():
    import lorakit.layers.dropout as dmod

    m = _two()
    m(torch.randn(4, 16))
    assert not [n for n, v in vars(dmod).items() if isinstance(v, dict) and not n.startswith("__")]


def test_shared_masks_option_is_owned_by_the_model_layers():
    m = _two()
    masks = share_dropout_masks(m)
    assert isinstance(masks, SharedMasks) and m.q.masks is masks and m.k.masks is masks
    x = torch.randn(8, 16)
    q, k = m(x)
    mask = masks.mask(x, 0.5)  # the cached mask both projections used
    torch.testing.assert_close(q, _ref(m.q, x, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, _ref(m.k, x, mask), rtol=1e-5, atol=1e-5)
    assert not torch.equal(_dense(masks.mask(x.clone(), 0.5)), _dense(mask))  # another tensor, another mask
    other = _two()
    assert other.q.masks is None  # another model is unaffected
    del x, q, k, mask
    assert len(masks) == 0  # entries die with their input
    share_dropout_masks(m, False)
    assert m.q.masks is None


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_dropout_mask_rate_lanes_and_unbiased(p):
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
    mask = dropout_mask(torch.ones(n), p)
    assert abs(mask.mean().item() - 1.0) < 0.01  # kept elements are scaled by 1/(1-p̃): unbiased
    assert abs(1 / mask.max().item() - (1 - p)) < 1e-5


def test_dropout_branch_gradients_match_autograd_reference():
    torch.manual_seed(0)
    lin = nn.Linear(12, 6)
    model = nn.Sequential(lin)
    lorakit.inject(model, lorakit.LoraConfig(r=3, lora_alpha=6, lora_dropout=0.3, target_modules=["0"],
                                             init_lora_weights=False))
    model.train()
    x = torch.randn(4, 5, 12, requires_grad=True)
    torch.manual_seed(3)
    y = model(x)
    torch.manual_seed(3)
    mask = _dense(draw_mask(x, 0.3))
    ad = model[0].lora["default"]
    a = ad.lora_A.detach().clone().requires_grad_(True)
    b = ad.lora_B.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    ref = lin(xr) + 2.0 * ((xr * mask) @ a.T) @ b.T
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ad.lora_A.grad, a.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ad.lora_B.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_masks_are_redrawn_identically_under_gradient_checkpointing(shared):
    """The recompute of a checkpointed block must see the masks of the first forward, or the gradients
    are wrong: compare with the same block run without checkpointing from the same RNG state."""
    m = _two(p=0.4)
    if shared:
        share_dropout_masks(m)
    x = torch.randn(6, 16, requires_grad=True)

    def block(inp):
        q, k = m(inp)
        return (q * k).sum(-1)

    grads = []
    for use_ckpt in (False, True):
        m.zero_grad()
        xi = x.detach().clone().requires_grad_(True)
        torch.manual_seed(7)
        out = checkpoint(block, xi, use_reentrant=False) if use_ckpt else block(xi)
        torch.manual_seed(123)  # the RNG moves on before backward: the recompute must restore it
        out.square().sum().backward()
        grads.append((out.detach(), xi.grad, m.q.lora["default"].lora_A.grad.clone(),
                      m.k.lora["default"].lora_B.grad.clone()))
    for plain, ckpt in zip(*grads):
        torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 7, 8, 180, 1001])
def test_pack_keep_round_trip(n):
    from lorakit.layers.dropout import pack_keep, unpack_keep

    keep = torch.rand(n) > 0.3
    saved = pack_keep(keep)
    assert saved.dtype == torch.uint8 and saved.numel() == (n + 7) // 8  # 1 bit an element on CPU
    back = unpack_keep(saved, torch.Size([n]), torch.float32)
    torch.testing.assert_close(back, keep.float(), rtol=0, atol=0)


def test_branch_saves_the_mask_as_bits_and_an_own_mask_as_is():
    """What autograd keeps for the dropout branch: 1 bit per element of x for a drawn mask (n/8 bytes,
    not the 4-byte float mask); a caller's own mask tensor unchanged. Gradients as the naive formula."""
    from lorakit.layers.branch import lora_linear_branch

    torch.manual_seed(0)
    x = torch.randn(3, 5, 12, requires_grad=True)  # 180 elements: not a multiple of 8
    a = torch.randn(4, 12, requires_grad=True)
    b = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(6, 12)
    own = (torch.rand(3, 5, 12) > 0.5).float() * 3.0
    for mask in (dropout_mask(x, 0.3), own):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            y = lora_linear_branch(x @ w.T, x, a, b, 0.5, mask)
        g = torch.randn_like(y)
        y.backward(g)
        grads = [x.grad.clone(), a.grad.clone(), b.grad.clone()]
        for t in (x, a, b):
            t.grad = None
        xr, ar, br = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
        ref = xr @ w.T + 0.5 * ((xr * mask) @ ar.T) @ br.T
        ref.backward(g)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, (xr.grad, ar.grad, br.grad)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        big = [t for t in saved if t.numel() >= x.numel() // 8 and t.dtype != x.dtype or t is own]
        if mask is own:
            assert any(t is own for t in saved)
        else:
            assert [(t.dtype, t.numel()) for t in big] == [(torch.uint8, (x.numel() + 7) // 8)]
