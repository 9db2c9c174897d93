"""Dropout masks kept as a seed (layers/seeded_dropout.py + csrc/dropout.c): the mask against the hash
written out independently in numpy, its statistics, the branch's output and gradients against the
naive formula, reproducibility, what autograd keeps, bf16, and the fallback when no kernel is built."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lorakit
from lorakit.layers import seeded_dropout
from lorakit.layers.branch import lora_linear_branch
from lorakit.layers.dropout import draw_mask
from lorakit.layers.seeded_dropout import SeededMask

pytestmark = pytest.mark.skipif(seeded_dropout.kernel() is None,
                                reason=f"no compiled dropout kernel here: {seeded_dropout.unavailable_reason()}")


def ref_keep(seed: int, p: float, n: int) -> np.ndarray:
    """The documented rule, in numpy: elements 2j, 2j+1 are the low/high signed 16-bit lanes of
    lowbias32(lowbias32(j·0x9E3779B9 ^ k0) + k1); dropped when the lane < round(p·2^16) − 2^15."""
    def lowbias32(x):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))

    k0, k1 = np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32)
    j = np.arange((n + 1) // 2, dtype=np.uint32)
    with np.errstate(over="ignore"):
        h = lowbias32(lowbias32((j * np.uint32(0x9E3779B9)) ^ k0) + k1)
    lanes = h.view(np.uint16).reshape(-1, 2)[:, ::1].reshape(-1).view(np.int16)[:n]  # little endian: low first
    return lanes.astype(np.int32) >= round(p * 65536) - 32768


def seed_after(manual_seed: int) -> int:
    """The seed the host draws right after torch.manual_seed: one int64 draw of torch's generator."""
    torch.manual_seed(manual_seed)
    return int(torch.empty((), dtype=torch.int64).random_())


@pytest.mark.parametrize("n", [1, 2, 3, 37, 1000, 4097])
@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_mask_is_the_documented_hash(n, p):
    rng = np.random.default_rng(n)
    for seed in [0, 1, 2**63 - 1, int(rng.integers(0, 2**63))]:
        m = SeededMask(seed, round(p * 65536) - 32768, 1.0, torch.Size([n]))
        np.testing.assert_array_equal(m.keep().numpy(), ref_keep(seed, p, n))


@pytest.fixture
def every_build():
    """The builds of the kernel this CPU runs (0 portable, 1 AVX2, 2 AVX-512), the widest restored after."""
    widest = seeded_dropout.use_build(2)
    yield list(range(widest + 1))
    seeded_dropout.use_build(2)


# Sizes around the AVX2 (16) and AVX-512 (32) group widths, so every build's tail hand-off is crossed;
# thresholds: p = 0 (keep all: −2¹⁵), p = 1 (drop all: 2¹⁵), the extreme lanes ±(2¹⁵ − 1), and ordinary ones.
@pytest.mark.parametrize("thr", [-32768, -32767, -29491, 0, 19661, 32767, 32768])
def test_every_build_gives_the_documented_bits(every_build, thr):
    rng = np.random.default_rng(thr & 0xFFFF)
    sizes = [0, 1, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 97, 1000, 4099]
    for build in every_build:
        assert seeded_dropout.use_build(build) == build
        for n in sizes:
            seed = int(rng.integers(0, 2**63)) * 2 + 1  # high bit set too: k1 ≥ 2³¹
            m = SeededMask(seed % 2**64, thr, 1.0, torch.Size([n]))
            want = torch.from_numpy(ref_keep_thr(m.seed, thr, n))
            assert torch.equal(m.keep(), want), (build, n)
            x32 = torch.randn(n)
            x32.view(torch.int32)[::7] = 0x7FC00123  # NaN payloads: kept bits are copied, not multiplied
            xb = torch.randn(n).to(torch.bfloat16)
            for x in (x32, xb):
                bits = torch.int32 if x.dtype == torch.float32 else torch.int16
                expect = torch.where(want, x.view(bits), torch.zeros((), dtype=bits))
                assert torch.equal(m.drop(x).view(bits), expect), (build, n, x.dtype)
                inplace = x.clone()
                m.drop(inplace, inplace)
                assert torch.equal(inplace.view(bits), expect), (build, n, x.dtype, "in place")


@pytest.mark.parametrize("level", [-1, 3, 1.5, 2.0, "2", True, None])
def test_use_build_refuses_what_is_not_a_build(level):
    with pytest.raises(lorakit.errors.ConfigError, match="give 0 .portable C., 1 .AVX2. or 2"):
        seeded_dropout.use_build(level)


def ref_keep_thr(seed: int, thr: int, n: int) -> np.ndarray:
    """ref_keep with the threshold given directly (p = 0 and p = 1 included)."""
    return ref_keep(seed, (thr + 32768) / 65536, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7,), (4, 33), (2, 3, 64)])
def test_drop_zeroes_exactly_the_dropped_elements(dtype, shape):
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype)
    x.view(-1)[0] = float("nan")  # bits are copied, not multiplied: a NaN stays NaN where kept
    m = draw_mask(x, 0.3)
    assert isinstance(m, SeededMask)
    keep = torch.from_numpy(ref_keep(m.seed, 0.3, x.numel())).view(shape)
    want = torch.where(keep, x, torch.zeros((), dtype=dtype))
    for got in (m.drop(x), m.drop(x, torch.empty_like(x)), m.drop(x.clone(), None)):
        assert got.dtype == dtype and torch.equal(got.isnan(), want.isnan())
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))
    inplace = x.clone()
    assert m.drop(inplace, inplace) is inplace
    assert torch.equal(torch.nan_to_num(inplace), torch.nan_to_num(want))
    dense = m.to_dense(torch.float32)
    assert torch.equal(dense, keep.float() * m.scale)


def test_drop_refuses_what_the_kernel_cannot_take():
    x = torch.randn(4, 8)
    m = draw_mask(x, 0.2)
    with pytest.raises(ValueError, match="contiguous CPU"):
        m.drop(x.T)  # not contiguous
    with pytest.raises(ValueError, match="contiguous CPU"):
        m.drop(torch.randn(5, 8))  # another size
    with pytest.raises(ValueError, match="overlaps"):
        buf = torch.randn(40)
        m.drop(buf[:32], buf[4:36])
    assert draw_mask(x.double(), 0.2).dtype == torch.float64  # other dtypes: the dense path


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_rate_unbiased_and_independent(p):
    n = 1 << 20
    x = torch.ones(n)
    torch.manual_seed(0)
    m1, m2 = draw_mask(x, p), draw_mask(x, p)
    k1, k2 = m1.keep().numpy(), m2.keep().numpy()
    p_used = round(p * 65536) / 65536
    sigma = (p_used * (1 - p_used) / n) ** 0.5
    for k in (k1, k2):
        assert abs((1 - k.mean()) - p_used) < 5 * sigma
        assert abs(m1.to_dense().mean().item() - 1.0) < 5 * sigma / (1 - p_used)  # 1/(1-p̃) scaling: unbiased
    # two masks: agreement as for independent draws, also against the next seed and shifted copies
    both = p_used ** 2 + (1 - p_used) ** 2
    m3 = SeededMask(m1.seed + 1, m1.threshold, m1.scale, m1.shape).keep().numpy()
    for a, b in ((k1, k2), (k1, m3), (k1[1:], k1[:-1]), (k1[2:], k1[:-2]), (k1[64:], k1[:-64])):
        assert abs((a == b).mean() - both) < 6 * (both * (1 - both) / a.size) ** 0.5
    # elements in the same 32-bit word (2j, 2j+1) are independent too
    pairs = k1.reshape(-1, 2)
    assert abs((~pairs[:, 0] & ~pairs[:, 1]).mean() - p_used ** 2) < 6 * (p_used ** 2 / (n / 2)) ** 0.5


def _model(p=0.25, dtype=torch.float32, in_f=24, out_f=10):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_f, out_f)).to(dtype)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["0"],
                                             init_lora_weights=False))
    return model.train()


@pytest.mark.parametrize("shape,transpose", [((3, 5, 24), False), ((7, 24), False), ((5, 3, 24), True)])
def test_host_output_and_gradients_match_the_naive_formula(shape, transpose):
    """y = W x + b + s·B A (x ⊙ m)/(1−p̃), with m rebuilt from the seed by the numpy reference."""
    model, p = _model(), 0.25
    torch.manual_seed(1)
    x0 = torch.randn(shape)
    x = (x0.transpose(0, 1) if transpose else x0).detach().requires_grad_(True)  # a strided input too
    torch.manual_seed(42)
    y = model(x)
    seed = seed_after(42)
    keep = torch.from_numpy(ref_keep(seed, p, x.numel())).view(x.shape)
    p_used = round(p * 65536) / 65536
    lin, ad = model[0].base_layer, model[0].lora["default"]
    xr = x.detach().clone().requires_grad_(True)
    a = ad.lora_A.detach().clone().requires_grad_(True)
    b = ad.lora_B.detach().clone().requires_grad_(True)
    ref = xr @ lin.weight.T + lin.bias + 2.0 * ((xr * keep / (1 - p_used)) @ a.T) @ b.T
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ad.lora_A.grad, a.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ad.lora_B.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_branch_matches_the_naive_formula():
    model, p = _model(p=0.1, in_f=64, out_f=32), 0.1
    x = torch.randn(16, 64, requires_grad=True)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    seed = seed_after(5)
    keep = torch.from_numpy(ref_keep(seed, p, x.numel())).view(x.shape)
    lin, ad = model[0].base_layer, model[0].lora["default"]
    xd = (x.detach() * keep).bfloat16()
    ref = (x.detach().bfloat16() @ lin.weight.bfloat16().T + lin.bias.bfloat16()).float() \
        + 2.0 / (1 - round(p * 65536) / 65536) * ((xd.float() @ ad.lora_A.detach().T) @ ad.lora_B.detach().T)
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.isfinite(ad.lora_A.grad).all() and ad.lora_A.grad.dtype == torch.float32  # fp32 factors


def test_same_seed_same_mask_and_nothing_mask_sized_is_saved():
    torch.manual_seed(0)
    x = torch.randn(8, 6, 64, requires_grad=True)  # bits of a mask would be 384 bytes; xa is 48 × 2
    a = torch.randn(2, 64, requires_grad=True)
    b = torch.randn(5, 2, requires_grad=True)
    w = torch.randn(5, 64)
    torch.manual_seed(9)
    m = draw_mask(x, 0.5)
    torch.manual_seed(9)
    assert draw_mask(x, 0.5).seed == m.seed  # torch.manual_seed reproduces it
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lora_linear_branch(x @ w.T, x, a, b, 0.5, m)
    # x (by reference), xa (N, r), A, B: no mask, no dropped copy of x
    big = [t for t in saved if t.numel() >= x.numel() // 8]
    assert len(big) == 1 and big[0] is x
    y.sum().backward()


def test_no_kernel_falls_back_to_dense_masks(monkeypatch):
    """LORAKIT_NO_CKERNEL=1, or no compiler: draw_mask gives a dense mask and training still works."""
    for how in ("env", "compiler"):
        seeded_dropout.reset()
        if how == "env":
            monkeypatch.setenv("LORAKIT_NO_CKERNEL", "1")
        else:
            monkeypatch.setenv("CC", "/nonexistent/cc")
            monkeypatch.setenv("XDG_CACHE_HOME", "/nonexistent-cache")
        try:
            assert seeded_dropout.kernel() is None and seeded_dropout.unavailable_reason()
            x = torch.randn(4, 24, requires_grad=True)
            mask = draw_mask(x, 0.5)
            assert isinstance(mask, torch.Tensor) and set(mask.unique().tolist()) <= {0.0, 2.0}
            model = _model(p=0.5)
            model(x).sum().backward()
            assert model[0].lora["default"].lora_A.grad is not None
        finally:
            monkeypatch.undo()
            seeded_dropout.reset()
    assert seeded_dropout.kernel() is not None


def test_a_broken_cached_library_is_rebuilt(monkeypatch, tmp_path):
    from lorakit import _cbuild

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    seeded_dropout.reset()
    try:
        path = _cbuild.library_path(seeded_dropout.SOURCE)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"\x7fELF truncated")  # what a killed build could have left
        assert seeded_dropout.kernel() is not None
        x = torch.randn(10)
        m = draw_mask(x, 0.5)
        np.testing.assert_array_equal(m.keep().numpy(), ref_keep(m.seed, 0.5, 10))
    finally:
        seeded_dropout.reset()
