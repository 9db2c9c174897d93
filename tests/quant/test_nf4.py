"""NF4 / FP4 quantization on its own: the worked example, layout, storage, errors, round-trip bounds,
and QLoRA Table 2's ordering in miniature."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from qhelpers import normal_weights, one_thread, torch_threads  # noqa: F401  (fixture)

from lorakit.errors import QuantizationError
from lorakit.quant import nf4
from lorakit.quant.codebooks import code_table, dynamic_map, max_half_gap
from lorakit.quant.kernels4 import dequantize_torch, quantize_torch

pytestmark = pytest.mark.usefixtures("one_thread")

WORKED_HEX = ("00000000001111111111111122222222233333334444445555556666667777788888899999"
              "aaaaaabbbbbbbcccccccddddddddddeeeeeeeeeeeeeeffffffffff")


def test_worked_example_matches_bitsandbytes_bytes():
    a = ((torch.arange(128.0) - 60) / 64).reshape(2, 64)
    q = nf4.quantize(a)
    assert q.absmax.tolist() == [0.9375, 1.046875]
    assert q.packed.shape == (64, 1) and q.packed.dtype == torch.uint8
    assert q.packed.view(-1).numpy().tobytes().hex() == WORKED_HEX


@pytest.mark.parametrize("double_quant,bits", [(False, 4.5), (True, 4.127)])
def test_bits_per_param_4096(double_quant, bits):
    q = nf4.quantize(torch.randn(4096, 4096, dtype=torch.bfloat16), double_quant=double_quant)
    assert q.bits_per_param == pytest.approx(bits, abs=5e-4)


def test_odd_count_pads_with_code_of_zero_and_keeps_shape():
    for qt, zero_code in [("nf4", 7), ("fp4", 0)]:
        x = torch.tensor([[1.0, -1.0, 0.5]])
        q = nf4.quantize(x, quant_type=qt)
        assert q.packed.shape == (2, 1)
        assert int(q.packed.view(-1)[1]) & 0xF == zero_code
        assert q.dequantize().shape == (1, 3)


def test_zero_blocks_and_tail_absmax_rule():
    q = nf4.quantize(torch.zeros(130))
    # whole blocks keep absmax 0; a short last block stores bitsandbytes' floor 1e-38
    assert q.absmax[:2].tolist() == [0.0, 0.0] and q.absmax[2].item() == pytest.approx(1e-38)
    assert torch.equal(q.dequantize(), torch.zeros(130))


def test_fp4_small_values_use_code_8_like_bitsandbytes():
    q = nf4.quantize(torch.tensor([1.0, 0.001, -0.001, 0.0]), quant_type="fp4")
    hi_lo = [b >> 4 for b in q.packed.view(-1).tolist()] + [b & 15 for b in q.packed.view(-1).tolist()]
    assert sorted(hi_lo) == sorted([3, 8, 0, 0])
    assert not q.dequantize().signbit().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_keeps_dtype_and_accepts_another(dtype):
    w = normal_weights(8, 64, dtype=dtype)
    q = nf4.quantize(w)
    assert q.dequantize().dtype == dtype and q.dequantize(torch.float32).dtype == torch.float32
    assert q.dtype == dtype and q.shape == w.shape and q.quant_type == "nf4" and q.blocksize == 64


def test_generic_torch_path_equals_cpu_path():
    w = normal_weights(48, 256, seed=3)
    for qt in ("nf4", "fp4"):
        q = nf4.quantize(w, blocksize=128, quant_type=qt)
        out = torch.empty(w.numel())
        dequantize_torch(q.packed.view(-1), q.absmax, w.numel(), 128, qt, out)
        assert torch.equal(out, q.dequantize().view(-1))


def test_large_tensor_threaded_path_equals_torch_path():
    w = normal_weights(1024, 2048, seed=4, dtype=torch.bfloat16)  # 2M elements: several workers
    with torch_threads(2):
        q = nf4.quantize(w)
        deq = q.dequantize()
    packed, absmax = torch.empty_like(q.packed.view(-1)), torch.empty_like(q.absmax)
    quantize_torch(w.view(-1), 64, "nf4", packed, absmax)
    assert torch.equal(packed, q.packed.view(-1)) and torch.equal(absmax, q.absmax)
    out = torch.empty(w.numel(), dtype=torch.bfloat16)
    dequantize_torch(q.packed.view(-1), q.absmax, w.numel(), 64, "nf4", out)
    assert torch.equal(out, deq.view(-1))


@pytest.mark.parametrize("bad", [0, 16, 48, 100, 8192, True])
def test_bad_blocksize_raises(bad):
    with pytest.raises(QuantizationError, match="blocksize"):
        nf4.quantize(torch.randn(64), blocksize=bad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.uint8, torch.int32])
def test_bad_dtype_raises(dtype):
    with pytest.raises(QuantizationError, match="dtype"):
        nf4.quantize(torch.zeros(64, dtype=dtype))


def test_bad_quant_type_empty_and_nonfinite_raise():
    with pytest.raises(QuantizationError, match="quant_type"):
        nf4.quantize(torch.randn(64), quant_type="int4")
    with pytest.raises(QuantizationError, match="empty"):
        nf4.quantize(torch.zeros(0, 4))
    w = torch.randn(256)
    w[130] = float("nan")
    with pytest.raises(QuantizationError, match="elements 128…191"):
        nf4.quantize(w)
    w[130] = float("inf")
    with pytest.raises(QuantizationError, match="inf/NaN"):
        nf4.quantize(w)


# -- round-trip properties -------------------------------------------------------------------------
def _per_block(x: torch.Tensor, bs: int) -> torch.Tensor:
    n = x.numel()
    pad = (-n) % bs
    return torch.nn.functional.pad(x.reshape(-1), (0, pad)).view(-1, bs)


def _dynamic_half_gap() -> float:
    m = dynamic_map(True)
    return max(float((m[1:] - m[:-1]).max()) / 2, float(1 + m[0]))  # incl. −1 → most negative code


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 700), bs=st.sampled_from([32, 64, 128, 256]), qt=st.sampled_from(["nf4", "fp4"]),
       scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**31 - 1))
def test_roundtrip_error_within_half_code_gap(n, bs, qt, scale, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    q = nf4.quantize(x, blocksize=bs, quant_type=qt)
    err = _per_block((q.dequantize(torch.float32) - x).abs(), bs)  # (blocks, bs)
    bound = max_half_gap(qt) * q.absmax.unsqueeze(1) * (1 + 1e-6)
    assert torch.all(err <= bound)
    # the block's largest magnitude is always exact (code ±1)
    amax_err = (q.dequantize(torch.float32).abs().view(-1)[: n] - x.abs()).abs()
    assert amax_err[x.abs().argmax()] <= 1e-6 * x.abs().max()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), qt=st.sampled_from(["nf4", "fp4"]), seed=st.integers(0, 2**31 - 1))
def test_double_quant_roundtrip_bounds(n, qt, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    plain, dq = nf4.quantize(x, quant_type=qt), nf4.quantize(x, quant_type=qt, double_quant=True)
    a, a_rec = plain.absmax, dq.absmax
    # absmax recovery: within half a dynamic-map step of its 256-block's scale
    scale = _per_block((a - a.mean()).abs(), 256).amax(1).repeat_interleave(256)[: a.numel()]
    assert torch.all((a_rec - a).abs() <= _dynamic_half_gap() * scale * (1 + 1e-5) + 1e-6 * a)  # + fp32 ulps
    # weights: same codes, so the error adds at most |Δabsmax| per block
    err = _per_block((dq.dequantize(torch.float32) - x).abs(), 64)
    bound = max_half_gap(qt) * a.unsqueeze(1) + (a_rec - a).abs().unsqueeze(1)
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-6 * a.unsqueeze(1))
    assert torch.equal(dq.packed, plain.packed)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 500), seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(["bf16", "fp16", "fp32"]))
def test_quantize_is_idempotent_on_dequantized_values(n, seed, dtype):
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dt)
    once = nf4.quantize(x).dequantize(torch.float32)
    twice = nf4.quantize(once).dequantize(torch.float32)
    assert torch.allclose(once, twice, rtol=1e-6, atol=0)


def test_codes_are_nearest_table_values():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(7))
    for qt in ("nf4", "fp4"):
        q = nf4.quantize(x, quant_type=qt)
        scaled = (x.view(-1, 64) * (1.0 / q.absmax).unsqueeze(1)).view(-1)
        got = q.dequantize(torch.float32).view(-1, 64) / q.absmax.unsqueeze(1)
        best = (scaled.unsqueeze(1) - code_table(qt)).abs().min(dim=1).values
        assert torch.allclose((got.view(-1) - scaled).abs(), best, atol=1e-6)


# -- QLoRA Table 2 in miniature --------------------------------------------------------------------
def int4_reference(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Symmetric blockwise int4: 15 levels −7…7 times absmax/7 (the comparison baseline)."""
    b = w.reshape(-1, blocksize)
    a = b.abs().amax(dim=1, keepdim=True)
    return (torch.round(b / a * 7).clamp(-7, 7) * a / 7).view_as(w)


def _mean_errors(w: torch.Tensor, bs: int) -> dict[str, float]:
    errs = {qt: (nf4.quantize(w, blocksize=bs, quant_type=qt).dequantize() - w).abs().mean().item()
            for qt in ("nf4", "fp4")}
    errs["int4"] = (int4_reference(w, bs) - w).abs().mean().item()
    return errs


def test_table2_ordering_on_normal_weights():
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))
    # NF4 (information-theoretically matched to N(0, 1)) beats both at every blocksize ...
    for bs in (64, 256, 4096):
        e = _mean_errors(w, bs)
        assert e["nf4"] < 0.85 * min(e["fp4"], e["int4"])
    # ... and with large blocks (absmax far in the tail) FP4's dense small values beat int4's grid.
    e = _mean_errors(w, 4096)
    assert e["nf4"] < e["fp4"] < e["int4"]


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_ties_go_to_the_lower_value(qt):
    from lorakit.quant.codebooks import midpoints

    mids = torch.tensor(midpoints(qt))
    x = torch.cat([torch.ones(1), mids])  # absmax 1: each scaled value sits exactly on a boundary
    got = nf4.quantize(x, quant_type=qt, blocksize=32).dequantize()[1:]
    table = code_table(qt).sort().values
    assert torch.equal(got, table[:-1])  # the lower neighbour of every boundary
