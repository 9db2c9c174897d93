"""Bit-exactness with bitsandbytes 0.50.2's CPU ``quantize_4bit`` / ``dequantize_4bit``, and double
quantization's round trip against its ``compress_statistics=True``.

Known bitsandbytes quirk, kept out of the comparison: its CPU C dequantizer for 2-D shapes whose row
length is not a multiple of the blocksize indexes blocks per row and returns wrong values (errors
~4x the quantization error). There we compare with bitsandbytes' own 1-D (flattened) dequantization.
"""

from __future__ import annotations

import pytest
import torch
from qhelpers import no_dynamo, one_thread, torch_threads  # noqa: F401  (fixtures)

from lorakit.quant import nf4

F = pytest.importorskip("bitsandbytes.functional")

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


def _random_cases(count: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        bs = BLOCKSIZES[i % len(BLOCKSIZES)]
        dtype = DTYPES[i % 3]
        qt = ("nf4", "fp4")[(i // 3) % 2]
        if i % 2:  # 2-D with rows a multiple of the blocksize: the layout Linear4bit uses
            shape = (int(torch.randint(1, 5, (1,), generator=g)), bs * int(torch.randint(1, 4, (1,), generator=g)))
        else:  # any element count, odd ones included
            n = int(torch.randint(1, 9000, (1,), generator=g))
            shape = (n,) if i % 4 == 0 else (1, n)
        scale = float(torch.rand(1, generator=g)) * 10 ** float(torch.randint(-3, 3, (1,), generator=g))
        x = torch.randn(shape, generator=g) * scale
        if i % 5 == 0:
            x.view(-1)[: x.numel() // 3] = 0  # zero blocks
        if i % 7 == 0:
            x.view(-1)[::11] = x.view(-1)[::11].round()  # values on code midpoints after scaling
        yield x.to(dtype), bs, qt


@pytest.mark.usefixtures("no_dynamo")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bytes_absmax_and_dequantize_bit_exact(seed):
    for x, bs, qt in _random_cases(48, seed):
        ours = nf4.quantize(x, blocksize=bs, quant_type=qt)
        ref_packed, ref_state = F.quantize_4bit(x, blocksize=bs, quant_type=qt)
        ctx = f"shape={tuple(x.shape)} dtype={x.dtype} blocksize={bs} {qt}"
        assert torch.equal(ours.packed, ref_packed), ctx
        assert torch.equal(ours.absmax, ref_state.absmax), ctx
        if x.dim() == 2 and x.shape[1] % bs:
            ref_state.shape = torch.Size([x.numel()])  # see the module docstring
        ref = F.dequantize_4bit(ref_packed, ref_state, quant_type=qt).reshape(x.shape)
        assert torch.equal(ours.dequantize(), ref), ctx


@pytest.mark.usefixtures("no_dynamo")
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_linear_weight_bit_exact(qt, dtype):
    w = (torch.randn(768, 1024, generator=torch.Generator().manual_seed(5)) * 0.02).to(dtype)
    with torch_threads(2):  # big enough for the threaded CPU path
        ours = nf4.quantize(w, quant_type=qt)
        deq = ours.dequantize()
    p, s = F.quantize_4bit(w, quant_type=qt)
    assert torch.equal(ours.packed, p) and torch.equal(ours.absmax, s.absmax)
    assert torch.equal(deq, F.dequantize_4bit(p, s, quant_type=qt))


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_double_quant_round_trip_against_bitsandbytes(qt):
    """The 8-bit absmax codes may differ (bitsandbytes' CPU kernel rounds its own way); the recovered
    absmax and the weights must agree within one dynamic-map step."""
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    ours = nf4.quantize(w, quant_type=qt, double_quant=True)
    p, s = F.quantize_4bit(w, quant_type=qt, compress_statistics=True)
    assert torch.equal(ours.packed, p)  # the 4-bit codes do not depend on double quantization
    ref_absmax = F.dequantize_blockwise(s.absmax, s.state2) + s.offset
    assert torch.allclose(ours.stats.offset, s.offset)
    assert torch.equal(ours.stats.q.absmax, s.state2.absmax)  # same second-level scales
    gap = (ours.absmax - ref_absmax).abs()
    step = 1 / 64 * s.state2.absmax.repeat_interleave(256)[: gap.numel()]  # largest dynamic-map step
    assert torch.all(gap <= step + 1e-7)
    assert (gap == 0).float().mean() > 0.95  # codes agree almost everywhere
    ref = F.dequantize_4bit(p, s, quant_type=qt).float()
    got = ours.dequantize().float()
    # |code| ≤ 1, so a weight moves by at most its block's absmax difference (+ bf16 rounding)
    bound = gap.repeat_interleave(64).view(w.shape) + 2 ** -7 * got.abs().clamp(min=ref.abs())
    assert torch.all((got - ref).abs() <= bound)
    assert ours.bits_per_param == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel(), rel=1e-3)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_exact_ties_round_like_bitsandbytes(qt):
    from lorakit.quant.codebooks import midpoints

    mids = torch.tensor(midpoints(qt))
    block = torch.cat([torch.ones(1), mids, -mids, torch.zeros(64 - 1 - 2 * mids.numel())])  # absmax 1
    x = torch.cat([block, block * 2.0 ** -3])  # scaled values land exactly on the midpoints
    ours = nf4.quantize(x, quant_type=qt)
    p, s = F.quantize_4bit(x, quant_type=qt)
    assert torch.equal(ours.packed, p) and torch.equal(ours.absmax, s.absmax)
