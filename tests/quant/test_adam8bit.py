"""Adam8bit: tracks torch.optim.AdamW, stores ~2 bytes of state per parameter, offload switch."""

from __future__ import annotations

import warnings

import pytest
import torch
from qhelpers import one_thread  # noqa: F401  (fixture)
from torch import nn

from lorakit.errors import ConfigError
from lorakit.quant import Adam8bit

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    y = x @ torch.randn(64, 32, generator=g) + 0.1 * torch.randn(256, 32, generator=g)
    return x, y


def _train(opt_cls, steps=150, **kw):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 32))
    x, y = _problem()
    opt = opt_cls(net.parameters(), lr=3e-3, weight_decay=0.01, **kw)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return net, opt, losses


def test_tracks_adamw_closely():
    ref_net, _, ref = _train(torch.optim.AdamW)
    net, opt, got = _train(Adam8bit, min_8bit_size=1024)
    assert got[-1] < 0.2 * got[0]
    # the curves agree to < 1% while the loss falls 5x, then stay within 2% of the starting loss
    assert max(abs(a - b) / a for a, b in zip(ref[:70], got[:70])) < 0.01
    assert max(abs(a - b) for a, b in zip(ref, got)) < 0.02 * ref[0]
    state = opt.state[net[0].weight]
    assert state["m_codes"].dtype == torch.uint8 and state["v_codes"].dtype == torch.uint8


def _least_squares(opt_cls, steps=60, **kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    y = x @ torch.randn(64, 32, generator=g)
    torch.manual_seed(1)
    lin = nn.Linear(64, 32)
    opt = opt_cls(lin.parameters(), lr=1e-2, weight_decay=0.01, **kw)
    for _ in range(steps):
        opt.zero_grad()
        ((lin(x) - y) ** 2).mean().backward()
        opt.step()
    return lin


def test_parameters_track_adamw_as_closely_as_bitsandbytes():
    ref = _least_squares(torch.optim.AdamW)
    ours = _least_squares(Adam8bit, min_8bit_size=0)
    dev = [float((p - q).detach().norm() / p.detach().norm()) for p, q in zip(ref.parameters(), ours.parameters())]
    assert max(dev) < 0.06, dev  # 8-bit moments: a few % after 60 steps
    bnb = pytest.importorskip("bitsandbytes")
    theirs = _least_squares(bnb.optim.AdamW8bit, min_8bit_size=0)
    dev_bnb = [float((p - q).detach().norm() / p.detach().norm()) for p, q in zip(ref.parameters(), theirs.parameters())]
    assert all(d <= 1.5 * b for d, b in zip(dev, dev_bnb)), (dev, dev_bnb)


def test_first_step_equals_adamw_up_to_state_rounding():
    p1 = nn.Parameter(torch.randn(4096))
    p2 = nn.Parameter(p1.detach().clone())
    g = torch.randn(4096)
    p1.grad, p2.grad = g.clone(), g.clone()
    torch.optim.AdamW([p1], lr=1e-2, weight_decay=0.1).step()
    Adam8bit([p2], lr=1e-2, weight_decay=0.1).step()
    torch.testing.assert_close(p1, p2)  # the first update uses the exact fp32 moments


def test_state_bytes_about_two_per_parameter():
    net, opt, _ = _train(Adam8bit, steps=2, min_8bit_size=4096)
    n8 = sum(p.numel() for p in net.parameters() if p.numel() >= 4096)
    small = sum(p.numel() for p in net.parameters() if p.numel() < 4096)
    assert opt.state_bytes() == pytest.approx(2 * n8 + 8 * n8 / 256 + 8 * small, rel=0.02)
    assert opt.state_bytes() < 0.3 * 8 * (n8 + small)


def test_state_dict_round_trip_keeps_codes():
    net, opt, _ = _train(Adam8bit, steps=3, min_8bit_size=0)
    sd = opt.state_dict()
    fresh = Adam8bit(net.parameters(), lr=3e-3)
    fresh.load_state_dict(sd)
    st = fresh.state[net[0].weight]
    assert st["m_codes"].dtype == torch.uint8 and st["m_absmax"].dtype == torch.float32 and st["step"] == 3


def test_offload_on_cpu_is_a_noop_and_says_so_once(caplog):
    p = nn.Parameter(torch.randn(8192))
    opt = Adam8bit([p], offload_state=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            p.grad = torch.randn(8192)
            opt.step()
    msgs = [str(w.message) for w in caught if "offload" in str(w.message)]
    assert len(msgs) == 1 and "changes nothing" in msgs[0]
    assert opt.state[p]["m_codes"].device.type == "cpu"


def test_bad_hyperparameters():
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError, match="betas"):
        Adam8bit(p, betas=(0.9, 1.0))
    with pytest.raises(ConfigError, match="lr"):
        Adam8bit(p, lr=-1)
    with pytest.raises(ConfigError, match="blocksize"):
        Adam8bit(p, blocksize=100)
