"""QuantLinear: forward/backward against a dequantized nn.Linear, the memory contract (no float
weight stored or saved for backward), buffers under state_dict / .to(), and LoRA on top."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from qhelpers import one_thread  # noqa: F401  (fixture)
from torch import nn

import lorakit
from lorakit.errors import AdapterStateError, QuantizationError
from lorakit.quant import QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")

FORMATS = ["nf4", "fp4", "int8", "int8_asym"]


def _linear(out_f=48, in_f=96, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


@pytest.mark.parametrize("quant_type", FORMATS)
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_forward_backward_match_dequantized_linear(quant_type, compute_dtype):
    lin = _linear()
    q = QuantLinear.from_linear(lin, quant_type=quant_type, compute_dtype=compute_dtype)
    w = q.dequantize_weight()
    assert w.shape == (48, 96) and w.dtype == compute_dtype
    x = torch.randn(3, 5, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = q(x)
    y_ref = (F.linear(x_ref.to(compute_dtype), w) + lin.bias.to(compute_dtype)).to(x.dtype)
    assert y.dtype == x.dtype and torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    tol = 0 if compute_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol * 0.1)
    assert q.bias.grad is None and not q.bias.requires_grad


def test_output_close_to_float_linear():
    lin = _linear(seed=1)
    x = torch.randn(16, 96)
    ref = lin(x)
    for qt, tol in [("nf4", 0.15), ("fp4", 0.2), ("int8", 0.02), ("int8_asym", 0.02)]:
        y = QuantLinear.from_linear(lin, quant_type=qt, compute_dtype=torch.float32)(x)
        assert ((y - ref).norm() / ref.norm()) < tol, qt


def test_stores_no_float_weight():
    q = QuantLinear.from_linear(_linear(bias=False))
    assert [n for n, _ in q.named_parameters()] == []
    assert {n: b.dtype for n, b in q.named_buffers()} == {
        "weight_packed": torch.uint8, "weight_absmax_codes": torch.uint8,
        "weight_absmax_scale": torch.float32, "weight_absmax_offset": torch.float32}
    assert q.in_features == 96 and q.out_features == 48 and q.bias is None
    assert q.bits_per_param == pytest.approx(q.qweight.bits_per_param)


@pytest.mark.parametrize("quant_type", FORMATS)
def test_autograd_saves_no_full_size_float_weight(quant_type):
    q = QuantLinear.from_linear(_linear(out_f=64, in_f=128), quant_type=quant_type, compute_dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    x = torch.randn(2, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    y.sum().backward()
    assert saved, "the function must save its quantized tensors"
    assert not [s for s in saved if s[0].is_floating_point and s[1] >= 64 * 128], saved
    assert x.grad is not None


def test_lora_on_quant_linear_saves_no_full_weight_and_refuses_in_place_merge():
    model = nn.Sequential(QuantLinear.from_linear(_linear(out_f=64, in_f=128), compute_dtype=torch.float32))
    x = torch.randn(4, 128)
    base = model(x)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    assert torch.equal(model(x), base)  # B = 0 ⇒ identical output
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.numel())) or t, lambda t: t):
        loss = model(x).pow(2).sum()
    loss.backward()
    assert not [s for s in saved if s[0].is_floating_point and s[1] >= 64 * 128]
    host = model[0]
    assert host.lora["default"].lora_B.grad is not None
    with pytest.raises(AdapterStateError, match="dequantize_and_merge"):
        lorakit.merge(model)
    assert lorakit.trainable_parameters(model).total == 64 * 128 + 64 + 4 * (64 + 128)  # W, bias, A, B


@pytest.mark.parametrize("quant_type", FORMATS)
def test_state_dict_round_trip(quant_type):
    a = QuantLinear.from_linear(_linear(seed=2), quant_type=quant_type)
    b = QuantLinear.from_linear(_linear(seed=3), quant_type=quant_type)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 96)
    assert torch.equal(a(x), b(x))


def test_to_dtype_keeps_codes_and_statistics():
    q = QuantLinear.from_linear(_linear(), double_quant=False)
    before = {n: b.clone() for n, b in q.named_buffers()}
    q.to(torch.bfloat16)
    q.half()
    for n, b in q.named_buffers():
        assert b.dtype == before[n].dtype and torch.equal(b, before[n]), n
    assert q.bias.dtype == torch.float16  # the bias follows like any parameter
    assert q.weight_packed._lorakit_params == 48 * 96


def test_from_linear_keeps_weight_dtype_for_dequantization():
    q = QuantLinear.from_linear(_linear(dtype=torch.bfloat16), compute_dtype=torch.float32)
    assert q.qweight.dtype == torch.bfloat16
    assert q.dequantize_weight().dtype == torch.float32
    assert "nf4, blocksize=64, double_quant=True" in repr(q)


def test_bad_arguments():
    with pytest.raises(QuantizationError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(QuantizationError, match="compute_dtype"):
        QuantLinear.from_linear(_linear(), compute_dtype=torch.int8)
    with pytest.raises(QuantizationError, match="quant_type"):
        QuantLinear.from_linear(_linear(), quant_type="int4")
    with pytest.raises(QuantizationError, match="blocksize"):
        QuantLinear.from_linear(_linear(), blocksize=100)
    with pytest.raises(QuantizationError, match="meta"):
        QuantLinear.from_linear(nn.Linear(4, 4, device="meta"))
