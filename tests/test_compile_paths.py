"""The GPU-ready paths trace as ONE graph under ``torch.compile(fullgraph=True)`` (no ``.item()`` syncs,
no numpy, no data-dependent Python control flow): the LoRA branch with dropout, DoRA, the NF4 + double-quant
dequantization inside a QLoRA layer, and the chunked cross-entropy. Checked on CPU with the ``aot_eager``
backend (graph capture + autograd, no C++ codegen), against the eager results."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.losses import chunked_cross_entropy

pytestmark = pytest.mark.slow  # each compile takes 5–30 s on the shared 2-core box


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def _grads(model, x, run=None):
    model.zero_grad(set_to_none=True)
    y = (run or model)(x)
    y.square().sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", ["lora", "dora", "qlora"])
def test_adapter_layers_compile_to_one_graph_and_match_eager(variant):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.SiLU(), nn.Linear(48, 32))
    if variant == "qlora":
        lorakit.quantize_model(model, "nf4", double_quant=True, compute_dtype=torch.float32)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False,
                                             use_dora=variant == "dora"))
    model.eval()  # no dropout: eager and compiled runs see the same function
    x = torch.randn(3, 5, 64)
    y_ref, g_ref = _grads(model, x)
    y, g = _grads(model, x, _compiled(model))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert g.keys() == g_ref.keys() and g
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-5)


def test_dropout_branch_compiles_in_training_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_dropout=0.2, target_modules=["0"], init_lora_weights=False))
    model.train()
    x = torch.ones(4, 64)
    y, g = _grads(model, x, _compiled(model))
    base = model[0].base_layer(x).detach()
    # Some inputs are dropped (the branch differs per row), and A received a gradient.
    assert not torch.allclose(y - base, (y - base)[:1].expand_as(y))
    assert g["0.lora.default.lora_A"].abs().sum() > 0


def test_chunked_cross_entropy_compiles_and_matches_the_plain_loss():
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    h = torch.randn(40, 16, requires_grad=True)
    y = torch.randint(0, 50, (40,))
    y[::7] = -100
    loss = _compiled(lambda h, y: chunked_cross_entropy(h, head, y, chunk_tokens=16, reduction="mean"))(h, y)
    loss.backward()
    h2 = h.detach().clone().requires_grad_(True)
    ref = nn.functional.cross_entropy(h2 @ head.weight.T, y, ignore_index=-100)  # independent reference
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_cross_entropy_with_a_frozen_head_compiles_to_one_graph(bias):
    # Eager, a frozen head is read in vocabulary tiles (losses._TiledFrozenCE), whose label check runs on
    # the host; under fullgraph compile the loss must take a traceable path and still match.
    torch.manual_seed(1)
    head = nn.Linear(16, 50, bias=bias).requires_grad_(False)
    h = torch.randn(40, 16, requires_grad=True)
    y = torch.randint(0, 50, (40,))
    y[::5] = -100
    loss = _compiled(lambda h, y: chunked_cross_entropy(h, head, y, chunk_tokens=16, tile_rows=16,
                                                         reduction="mean"))(h, y)
    loss.backward()
    h2 = h.detach().clone().requires_grad_(True)
    ref = nn.functional.cross_entropy(nn.functional.linear(h2, head.weight, head.bias), y, ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
