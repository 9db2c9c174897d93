"""int8 per-output-channel quantization: formulas, pinned rounding (half to even), degenerate rows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from qhelpers import one_thread  # noqa: F401  (fixture)

from lorakit.errors import QuantizationError
from lorakit.quant import int8

pytestmark = pytest.mark.usefixtures("one_thread")


def test_symmetric_formula_and_ties_half_to_even():
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]])  # absmax 127 → scale exactly 1
    q = int8.quantize(w)
    assert q.scale.tolist() == [1.0] and q.q.dtype == torch.int8
    assert q.q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 4]]  # torch.round: half to even
    assert torch.equal(q.dequantize(), q.q.float())


def test_asymmetric_formula_and_ties_half_to_even():
    w = torch.tensor([[0.0, 255.0, 0.5, 1.5, 2.5, 100.5]])  # s = 1, z = 0
    q = int8.quantize(w, symmetric=False)
    assert q.scale.tolist() == [1.0] and q.zero_point.tolist() == [0] and q.q.dtype == torch.uint8
    assert q.q.tolist() == [[0, 255, 0, 2, 2, 100]]
    w = torch.tensor([[-1.0, 0.0, 254.0]])  # s = 1, z = round(1) = 1
    q = int8.quantize(w, symmetric=False)
    assert q.zero_point.tolist() == [1] and q.q.tolist() == [[0, 1, 255]]
    assert torch.equal(q.dequantize(), w)


def test_asymmetric_zero_point_follows_spec():
    w = torch.tensor([[-1.5, 127.0, 3.0]])
    q = int8.quantize(w, symmetric=False)
    s = (127.0 - -1.5) / 255
    assert q.scale.item() == pytest.approx(s)
    assert q.zero_point.item() == round(1.5 / s)
    assert q.q[0, 1].item() == 255 and q.q[0, 0].item() == 0


@pytest.mark.parametrize("symmetric", [True, False])
def test_constant_and_zero_rows_do_not_divide_by_zero(symmetric):
    w = torch.tensor([[0.0] * 4, [3.0] * 4, [-2.0] * 4, [1e-30] * 4])
    q = int8.quantize(w, symmetric=symmetric)
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    assert torch.equal(q.dequantize(), w)  # constant rows come back exactly


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 8), cols=st.integers(1, 64), seed=st.integers(0, 2**31 - 1),
       symmetric=st.booleans(), shift=st.floats(-5, 5))
def test_error_within_half_a_step(rows, cols, seed, symmetric, shift):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) + shift
    q = int8.quantize(w, symmetric=symmetric)
    err = (q.dequantize() - w).abs()
    assert torch.all(err <= q.scale.unsqueeze(1) * (0.5 + 1e-4) + 1e-6 * w.abs())


def test_bits_and_layout():
    w = torch.randn(64, 128, dtype=torch.bfloat16)
    sym, asym = int8.quantize(w), int8.quantize(w, symmetric=False)
    assert sym.bits_per_param == pytest.approx(8 + 32 / 128)
    assert asym.bits_per_param == pytest.approx(8 + 64 / 128)
    assert sym.dequantize().dtype == torch.bfloat16 and sym.dequantize(torch.float32).dtype == torch.float32
    assert sym.quant_type == "int8" and asym.quant_type == "int8_asym"
    rebuilt = asym.layout.build(asym.tensors())
    assert torch.equal(rebuilt.dequantize(), asym.dequantize())


def test_bad_inputs():
    with pytest.raises(QuantizationError, match="dtype"):
        int8.quantize(torch.zeros(4, 4, dtype=torch.int32))
    with pytest.raises(QuantizationError, match="non-empty"):
        int8.quantize(torch.zeros(0, 4))
    w = torch.randn(3, 4)
    w[2, 1] = float("nan")
    with pytest.raises(QuantizationError, match="row 2"):
        int8.quantize(w)
