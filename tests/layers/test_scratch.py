"""The branch's reused (N, in) buffer (layers/scratch.py): reuse must never change a result.

The risk of a shared buffer is aliasing: a later use overwriting what an earlier one still needs. So a
stack of adapted layers of different widths (the buffer grows, is reused wider and narrower, forward and
backward interleave) and threads running at once must give exactly what fresh temporaries give, and the
gradients must match the naive formula with the masks rebuilt from their seeds.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import lorakit
from lorakit.layers import scratch, seeded_dropout
from lorakit.layers.branch import lora_linear_branch
from lorakit.layers.dropout import draw_mask

pytestmark = pytest.mark.skipif(seeded_dropout.kernel() is None,
                                reason=f"no compiled dropout kernel here: {seeded_dropout.unavailable_reason()}")


def _stack() -> nn.Module:
    """Widths 24 → 40 → 8 → 24 (the scratch buffer grows, then serves narrower inputs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 8), nn.Tanh(), nn.Linear(8, 24))
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["0", "2", "4"],
                                             init_lora_weights=False))
    return model.train()


def _run(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    y.pow(2).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


def test_reused_buffer_gives_exactly_what_fresh_temporaries_give():
    model, x = _stack(), torch.randn(6, 5, 24)
    was = scratch.set_enabled(False)
    try:
        y_fresh, g_fresh = _run(model, x, 7)
    finally:
        scratch.set_enabled(was)
    for _ in range(2):  # the second time the buffer already exists
        y, g = _run(model, x, 7)
        assert torch.equal(y, y_fresh)
        assert all(torch.equal(a, b) for a, b in zip(g, g_fresh))


def test_reused_buffer_gradients_match_the_naive_formula():
    """One layer, x (N, 40) after a wider one used the buffer: ∂x, ∂A, ∂B vs the formula with the mask."""
    torch.manual_seed(3)
    wide = torch.randn(64, 96)
    scratch.scratch(wide).fill_(float("nan"))  # a stale, larger buffer: nothing of it may leak into results
    model = nn.Sequential(nn.Linear(40, 12))
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["0"],
                                             init_lora_weights=False))
    model.train()
    x = torch.randn(9, 40, requires_grad=True)
    torch.manual_seed(11)
    mask = draw_mask(x, 0.3)
    keep = mask.keep().double()
    torch.manual_seed(11)
    y = model(x)
    g = torch.randn_like(y)
    y.backward(g)
    lin, ad = model[0].base_layer, model[0].lora["default"]
    xr = x.detach().double().requires_grad_(True)
    a = ad.lora_A.detach().double().requires_grad_(True)
    b = ad.lora_B.detach().double().requires_grad_(True)
    ref = xr @ lin.weight.double().T + lin.bias.double() + 2.0 * ((xr * keep * mask.scale) @ a.T) @ b.T
    ref.backward(g.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ad.lora_A.grad.double(), a.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ad.lora_B.grad.double(), b.grad, rtol=1e-4, atol=1e-5)


def _branch_step(k_in: int, seed: int) -> list[torch.Tensor]:
    """One branch fwd + bwd with a fixed SeededMask (no global RNG): y, ∂x, ∂A, ∂B."""
    g = torch.Generator().manual_seed(k_in)
    w = torch.randn(16, k_in, generator=g)
    x = torch.randn(256, k_in, generator=g).requires_grad_(True)
    a = torch.randn(4, k_in, generator=g).requires_grad_(True)
    b = torch.randn(16, 4, generator=g).requires_grad_(True)
    thr, sc = seeded_dropout.lane_rule(0.3)
    y = lora_linear_branch(x.detach() @ w.T, x, a, b, 2.0, seeded_dropout.SeededMask(seed, thr, sc, x.shape))
    y.pow(2).sum().backward()
    return [y.detach(), x.grad, a.grad, b.grad]


def test_threads_each_get_their_own_buffer():
    """Two threads alternating widths (so each grows and reuses its buffer) at once: every result equals
    the same step run alone."""
    plan = [(64 + 96 * (i % 3), 1000 + i) for i in range(30)]
    want = {job: _branch_step(*job) for job in plan}
    got: dict[int, list] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def work(t: int) -> None:
        barrier.wait()
        for job in plan[t::2] + plan[1 - t::2]:
            got[t].append((job, _branch_step(*job)))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(got[0]) == len(got[1]) == len(plan)
    for t in (0, 1):
        for job, res in got[t]:
            assert all(torch.equal(r, w) for r, w in zip(res, want[job])), (t, job)


def test_no_buffer_off_cpu_or_when_disabled():
    assert scratch.scratch(torch.empty(4, 8, device="meta")) is None
    was = scratch.set_enabled(False)
    try:
        assert scratch.scratch(torch.empty(4, 8)) is None
    finally:
        scratch.set_enabled(was)
    buf = scratch.scratch(torch.empty(3, 5, dtype=torch.bfloat16))
    assert buf.shape == (3, 5) and buf.dtype == torch.bfloat16 and buf.is_contiguous()
