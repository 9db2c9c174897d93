"""The tiled 4-bit matmul (quant/autograd4.py): the same function as the whole-matrix path, whatever
the tile height, block alignment or short last block; tiles always cover whole blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from qhelpers import one_thread  # noqa: F401  (fixture)
from torch import nn

from lorakit.quant import QuantLinear, autograd4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def small_tiles(monkeypatch):
    # force many tiles on tiny layers: 1 row minimum, ~200 weights per tile
    monkeypatch.setattr(autograd4, "TILE_ELEMENTS", 200)
    monkeypatch.setattr(autograd4, "MIN_ROWS", 1)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,blocksize", [((33, 37), 64), ((48, 100), 64), ((40, 96), 32), ((7, 300), 128)])
def test_tiled_matches_dense_formula(small_tiles, quant_type, double_quant, shape, blocksize):
    out_f, in_f = shape
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=True)
    q = QuantLinear.from_linear(lin, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize,
                                compute_dtype=torch.float32)
    w = q.dequantize_weight()  # the whole-matrix dequantization (tested bit-exact against bitsandbytes)
    x = torch.randn(2, 3, in_f, requires_grad=True)
    y = q(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref @ w.T + lin.bias  # the naive formula
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_tiled_bf16_compute_matches_bf16_linear(small_tiles):
    torch.manual_seed(1)
    lin = nn.Linear(100, 48, bias=False)
    q = QuantLinear.from_linear(lin, quant_type="nf4", compute_dtype=torch.bfloat16)
    w = q.dequantize_weight()
    assert w.dtype == torch.bfloat16
    x = torch.randn(5, 100)
    ref = F.linear(x.to(torch.bfloat16), w).float()
    torch.testing.assert_close(q(x), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("in_f", [37, 96, 100, 576, 4096, 11008])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("tokens", [1, 64, 4096])
def test_tiles_cover_whole_blocks(in_f, blocksize, tokens):
    rows = autograd4.tile_rows(100_000, in_f, blocksize, tokens)
    assert rows >= 1 and (rows * in_f) % blocksize == 0


def test_tiled_path_only_for_4bit_on_cpu():
    lin = nn.Linear(64, 64)
    for qt, expected in (("nf4", True), ("fp4", True), ("int8", False), ("int8_asym", False)):
        q = QuantLinear.from_linear(lin, quant_type=qt)
        assert autograd4.applies(q.layout, torch.device("cpu")) is expected
        assert not autograd4.applies(q.layout, torch.device("meta"))


def test_tiled_backward_saves_no_dense_weight(small_tiles):
    q = QuantLinear.from_linear(nn.Linear(128, 64), compute_dtype=torch.float32)
    saved = []
    x = torch.randn(2, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.numel())) or t, lambda t: t):
        y = q(x)
    y.sum().backward()
    assert not [s for s in saved if s[0].is_floating_point and s[1] >= 64 * 128], saved
