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


# -- two rebuilds a step under gradient checkpointing (W kept from the recomputation) --------------
def _qlora_model(checkpointing: bool):
    import lorakit
    from lorakit.quant import prepare_for_kbit_training, quantize_model

    from conftest import tiny_llama

    model = prepare_for_kbit_training(quantize_model(tiny_llama(), compute_dtype=torch.float32),
                                      gradient_checkpointing=checkpointing)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:  # B != 0, so every base matmul's input gradient matters
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


def _step_counting(model, monkeypatch):
    """One forward + backward; returns (LoRA grads, weights dequantized / weights in the model)."""
    from lorakit.quant import kernels4_cpu

    done = []
    real = kernels4_cpu.dequantize_span
    monkeypatch.setattr(kernels4_cpu, "dequantize_span",
                        lambda packed, absmax, bs, qt, start, stop, *a: done.append(stop - start) or
                        real(packed, absmax, bs, qt, start, stop, *a))
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    total = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, sum(done) / total


def test_recomputation_keeps_w_for_backward(small_tiles, monkeypatch):
    autograd4.clear_pool()
    kept_grads, rebuilds = _step_counting(_qlora_model(True), monkeypatch)
    assert rebuilds == 2  # forward + recomputation; the backward reads what the recomputation kept
    assert not autograd4._kept.weights  # every kept W was consumed by its backward
    held = autograd4.pooled_bytes()
    assert 0 < held <= autograd4.KEEP_BYTES
    # one block's weights (fp32) at most: the pool is reused from block to block
    block = sum(m.in_features * m.out_features * 4 for m in _qlora_model(True).model.layers[0].modules()
                if isinstance(m, QuantLinear))
    assert held == block
    monkeypatch.setattr(autograd4, "KEEP_BYTES", 0)  # nothing kept: three rebuilds, the same gradients
    autograd4.clear_pool()
    grads, rebuilds = _step_counting(_qlora_model(True), monkeypatch)
    assert rebuilds == 3 and autograd4.pooled_bytes() == 0
    for name, g in grads.items():
        assert torch.equal(g, kept_grads[name]), name  # bit-identical: same tiles, same order


def test_keep_budget_bounds_the_pool(small_tiles, monkeypatch):
    autograd4.clear_pool()
    q_bytes = 32 * 32 * 4  # q_proj of the tiny llama, fp32
    monkeypatch.setattr(autograd4, "KEEP_BYTES", q_bytes + 100)
    _, rebuilds = _step_counting(_qlora_model(True), monkeypatch)
    assert autograd4.pooled_bytes() <= q_bytes + 100
    assert 2 < rebuilds < 3


def test_no_checkpointing_keeps_nothing(small_tiles, monkeypatch):
    autograd4.clear_pool()
    _, rebuilds = _step_counting(_qlora_model(False), monkeypatch)
    # forward + backward (none for layer 0's q/k/v: without checkpointing the embedding output needs no
    # gradient); no recomputation, nothing kept
    assert 1.5 < rebuilds <= 2
    assert autograd4.pooled_bytes() == 0 and not autograd4._kept.weights


def test_keep_context_is_reentrant_with_retain_graph(small_tiles):
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(64, 48, bias=False), compute_dtype=torch.float32)
    w = q.dequantize_weight()
    x = torch.randn(5, 64, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(q, x, use_reentrant=False, context_fn=autograd4.recompute_context)
    g = torch.randn_like(y)
    y.backward(g, retain_graph=True)
    y.backward(g)  # recomputes again under the same context object
    torch.testing.assert_close(x.grad, 2 * (g @ w), rtol=1e-5, atol=1e-5)
    assert not autograd4._kept.weights


def test_estimate_counts_the_pool_until_it_is_resident(small_tiles, monkeypatch):
    from lorakit.train.estimate import recompute_kept_bytes

    model = _qlora_model(True)
    block = sum(m.in_features * m.out_features * 4 for m in model.model.layers[0].modules()
                if isinstance(m, QuantLinear))
    assert recompute_kept_bytes(model) == block
    monkeypatch.setattr(autograd4, "KEEP_BYTES", 32 * 32 * 4)  # only q_proj (first in forward order) fits
    assert recompute_kept_bytes(model) == 32 * 32 * 4
    assert recompute_kept_bytes(_qlora_model(False)) == 0
