"""The code books: literal tables and the dynamic map, checked against bitsandbytes and on their own."""

from __future__ import annotations

import pytest
import torch
from qhelpers import one_thread  # noqa: F401  (fixture)

from lorakit.quant.codebooks import (
    FP4_SORTED_CODES,
    code_table,
    dynamic_map,
    max_half_gap,
    midpoints,
    sorted_codes,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_nf4_table_shape_and_symmetry_facts():
    t = code_table("nf4")
    assert t.dtype == torch.float32 and t.shape == (16,)
    assert torch.all(t[1:] > t[:-1])  # sorted: code = rank
    assert t[0] == -1 and t[7] == 0 and t[15] == 1  # exact endpoints and an exact zero (QLoRA §3)


def test_nf4_table_is_the_literal_not_regenerated_quantiles():
    # QLoRA eq. 4 regenerated in float64 lands within ~1e-7 of the table, but not on it.
    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 0.9677083
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    regenerated = (v / v.abs().max()).float()
    diff = (regenerated - code_table("nf4")).abs().max()
    assert 0 < diff < 1e-6


def test_fp4_table_sort_order_and_zeros():
    t = code_table("fp4")
    assert t.abs().max() == 1 and t[0] == 0 and t[8] == 0 and not t[8].signbit()  # +0 twice
    ranked = t[list(FP4_SORTED_CODES)]
    assert torch.all(ranked[1:] >= ranked[:-1])
    assert sorted_codes("nf4") == tuple(range(16))
    assert len(midpoints("fp4")) == 15 and midpoints("fp4")[7] == 0.0


def test_tables_equal_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    for qt in ("nf4", "fp4"):
        ref = F.get_4bit_type(qt, device="cpu")
        assert torch.equal(code_table(qt), ref)
        assert torch.equal(code_table(qt).signbit(), ref.signbit())
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    for qt in ("nf4", "fp4"):
        bounds, order = _get_4bit_quantize_bounds(qt, torch.device("cpu"))
        assert torch.equal(torch.tensor(midpoints(qt)), bounds)
        assert tuple(order.tolist()) == sorted_codes(qt)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_structure(signed):
    m = dynamic_map(signed)
    assert m.shape == (256,) and m.dtype == torch.float32
    assert torch.all(m[1:] > m[:-1])  # strictly increasing: 256 distinct codes
    assert 0.0 in m.tolist() and m[-1] == 1.0
    if signed:
        assert m[0] > -1 and m[0] < -0.99  # no −1 in the signed map
        assert (m < 0).sum() == 127
    else:
        assert m[0] == 0
    # Smallest non-zero magnitude sits in the 1e-6 decade, the largest steps near 1 are ~1/64 (signed).
    nz = m[m != 0].abs()
    assert 1e-7 < nz.min() < 1e-6


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(dynamic_map(signed), F.create_dynamic_map(signed=signed))


def test_max_half_gap():
    assert max_half_gap("nf4") == pytest.approx((-0.6961928009986877 + 1) / 2, rel=1e-6)  # widest gap at −1
    assert max_half_gap("fp4") == pytest.approx((1 - 2 / 3) / 2, rel=1e-6)
