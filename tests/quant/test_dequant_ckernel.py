"""The compiled 4-bit lookup kernel (quant/ckernel.py, quant/csrc/dequant4.c): bit-identical to
bitsandbytes' ``dequantize_4bit``, to a naive ``table[code] · absmax`` written here and to the numpy
fallback, in both of its loops (portable and SIMD), for every output dtype; and the fallback when it is
disabled, cannot be compiled, or its cached file is broken (the build cache itself is ``_cbuild``'s)."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from qhelpers import no_dynamo, one_thread, torch_threads  # noqa: F401  (fixtures)

from lorakit import _cbuild
from lorakit.quant import autograd4, ckernel, nf4

F = pytest.importorskip("bitsandbytes.functional")

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_cc = pytest.mark.skipif(shutil.which("cc") is None and not os.environ.get("CC"),
                              reason="no C compiler (cc): only the numpy path exists here")


@pytest.fixture
def fresh_kernel(monkeypatch):
    """A kernel state of its own (restored after: the next test loads the shared cache again)."""
    monkeypatch.delenv("LORAKIT_NO_CKERNEL", raising=False)
    ckernel.reset()
    yield
    ckernel.reset()


def naive(packed: torch.Tensor, absmax: torch.Tensor, n: int, bs: int, qt: str, dtype) -> torch.Tensor:
    """table[code] · absmax in fp32, cast once; the table is bitsandbytes' own."""
    table = F.get_4bit_type(qt, device="cpu").float()
    b = packed.view(-1).long()
    codes = torch.stack([b >> 4, b & 15], dim=1).view(-1)[:n]
    scale = absmax.float().repeat_interleave(bs)[:n]
    return (table[codes] * scale).to(dtype)


def naive_double_quant_absmax(q: nf4.Quantized4bit) -> torch.Tensor:
    """The double-quantized absmax: bitsandbytes' dynamic map[code] · second-level absmax + mean."""
    dyn = F.create_dynamic_map(signed=True).float()
    st = q.stats.q
    scale = st.absmax.repeat_interleave(st.blocksize)[: st.codes.numel()]
    return dyn[st.codes.long()] * scale + q.stats.offset


def cases(seed: int):
    g = torch.Generator().manual_seed(seed)
    for i, bs in enumerate(BLOCKSIZES):
        for qt in ("nf4", "fp4"):
            n = bs * int(torch.randint(1, 6, (1,), generator=g))
            if (i + len(qt)) % 2:  # an odd count: a short last block
                n += int(torch.randint(0, bs, (1,), generator=g)) | 1
            yield torch.randn(n, generator=g) * 10.0 ** float(torch.randint(-3, 2, (1,), generator=g)), bs, qt


@needs_cc
@pytest.mark.usefixtures("no_dynamo", "fresh_kernel")
@pytest.mark.parametrize("dtype", DTYPES)
def test_c_equals_bitsandbytes_numpy_and_naive(dtype, monkeypatch):
    assert ckernel.library() is not None, ckernel.unavailable_reason()
    for x, bs, qt in cases(0):
        x = x.to(dtype)
        ctx = f"n={x.numel()} blocksize={bs} {qt} {dtype}"
        ours = nf4.quantize(x, blocksize=bs, quant_type=qt)
        packed, state = F.quantize_4bit(x, blocksize=bs, quant_type=qt)
        assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, state.absmax), ctx
        c_path = ours.dequantize()  # the C kernel (odd counts: a short last block, torch's tail path)
        assert torch.equal(c_path, F.dequantize_4bit(packed, state, quant_type=qt).reshape(x.shape)), ctx
        assert torch.equal(c_path, naive(packed, state.absmax, x.numel(), bs, qt, dtype)), ctx
        with monkeypatch.context() as m:
            m.setenv("LORAKIT_NO_CKERNEL", "1")
            assert torch.equal(ours.dequantize(), c_path), ctx


@needs_cc
@pytest.mark.usefixtures("fresh_kernel")
@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_both_loops_on_spans(simd, dtype, double_quant):
    if simd and not ckernel.simd_available():
        pytest.skip("this CPU has no AVX2/F16C: only the portable loop runs")
    for x, bs, qt in cases(1):
        q = nf4.quantize(x, blocksize=bs, quant_type=qt, double_quant=double_quant)
        absmax = q.absmax
        if double_quant:
            assert torch.equal(absmax, naive_double_quant_absmax(q)), f"{bs} {qt}"
        full = x.numel() - x.numel() % bs
        want = naive(q.packed, absmax, x.numel(), bs, qt, dtype)
        for start, stop in [(0, full), (bs, full), (0, bs), (full, full)]:
            out = torch.full((stop - start,), 7.0, dtype=dtype)
            done = ckernel.dequant4(q.packed.view(-1), absmax, bs, qt, start, stop, out, simd=simd)
            if not simd and dtype != torch.float32:  # the portable loop leaves 16-bit casts to torch
                assert done is (start == stop)
                continue
            assert done and torch.equal(out, want[start:stop]), f"{bs} {qt} [{start}, {stop})"


@needs_cc
@pytest.mark.usefixtures("fresh_kernel")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_casts_round_like_torch_on_edge_values(dtype):
    """Byte 0xFF is code 15 twice, 1.0 in NF4: out == absmax, so absmax carries the values to cast."""
    if not ckernel.simd_available():
        pytest.skip("the 16-bit casts run in the SIMD loop only")
    finfo = torch.finfo(dtype)
    edge = [0.0, -0.0, float("inf"), float("-inf"), finfo.max, -finfo.max, finfo.tiny, finfo.tiny / 2,
            finfo.tiny / 4, 1e-45, 3.0e38, 65504.0, 65519.99, 65520.0, -65520.0, 2.0**-24, 2.0**-25,
            2.0**-25 * 1.0001, 2.0**-26, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11]
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 16,), generator=torch.Generator().manual_seed(5),
                         dtype=torch.int64).to(torch.int32)
    absmax = torch.cat([torch.tensor(edge, dtype=torch.float32), bits.view(torch.float32)])
    absmax = torch.where(absmax.isnan(), torch.zeros_like(absmax), absmax)  # NaN: checked below
    absmax = torch.cat([absmax, torch.tensor([float("nan")])])
    bs = 32
    packed = torch.full((absmax.numel() * bs // 2,), 0xFF, dtype=torch.uint8)
    out = torch.empty(absmax.numel() * bs, dtype=dtype)
    assert ckernel.dequant4(packed, absmax, bs, "nf4", 0, out.numel(), out)
    want = absmax.repeat_interleave(bs).to(dtype)
    assert torch.equal(out[:-bs], want[:-bs])
    assert out[-bs:].isnan().all()


@needs_cc
@pytest.mark.usefixtures("fresh_kernel")
def test_threaded_whole_weight_and_tiled_matmul_match_numpy_path(monkeypatch):
    w = torch.randn(1024, 1040) * 0.02  # 1 M weights: several workers; rows not a multiple of the blocksize
    x = torch.randn(3, 1040)
    q = nf4.quantize(w, double_quant=True)
    layout, tensors = q.layout, tuple(q.tensors().values())

    def run():
        with torch_threads(2):
            whole = q.dequantize(torch.bfloat16), q.dequantize(torch.float32)
        xg = x.clone().requires_grad_(True)
        y = autograd4.TiledDequantLinear4.apply(xg, layout, torch.float32, *tensors)
        y.backward(torch.ones_like(y))
        return (*whole, y, xg.grad)

    c_path = run()
    monkeypatch.setenv("LORAKIT_NO_CKERNEL", "1")
    numpy_path = run()
    for a, b in zip(c_path, numpy_path):
        assert torch.equal(a, b)
    assert torch.equal(c_path[1], naive(q.packed, q.absmax, w.numel(), 64, "nf4", torch.float32).view_as(w))


@pytest.mark.usefixtures("fresh_kernel")
def test_env_var_disables_the_kernel(monkeypatch):
    monkeypatch.setenv("LORAKIT_NO_CKERNEL", "1")
    assert ckernel.library() is None
    out = torch.empty(64)
    assert not ckernel.dequant4(torch.zeros(32, dtype=torch.uint8), torch.ones(1), 64, "nf4", 0, 64, out)
    x = torch.randn(300)
    q = nf4.quantize(x, double_quant=True)
    assert torch.equal(q.dequantize(), naive(q.packed, naive_double_quant_absmax(q), 300, 64, "nf4", torch.float32))


@pytest.mark.usefixtures("fresh_kernel")
def test_missing_compiler_falls_back_to_numpy(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert ckernel.library() is None and "no C compiler" in ckernel.unavailable_reason()
    assert not (tmp_path / "cache" / "lorakit").exists() or not any((tmp_path / "cache" / "lorakit").iterdir())
    x = torch.randn(5, 130, dtype=torch.bfloat16)
    q = nf4.quantize(x, quant_type="fp4", blocksize=32)
    packed, state = F.quantize_4bit(x.view(-1), blocksize=32, quant_type="fp4")
    assert torch.equal(q.dequantize().view(-1), F.dequantize_4bit(packed, state, quant_type="fp4").view(-1))


@pytest.mark.usefixtures("fresh_kernel")
def test_failing_build_falls_back(monkeypatch, tmp_path):
    cc = tmp_path / "bad-cc"
    cc.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo bad-cc 1.0; exit 0; fi\necho broken >&2; exit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert ckernel.library() is None and "build failed" in ckernel.unavailable_reason()
    assert list((tmp_path / "cache" / "lorakit").glob("*")) == []  # no half-written file left behind
    q = nf4.quantize(torch.randn(640))
    assert torch.equal(q.dequantize(), naive(q.packed, q.absmax, 640, 64, "nf4", torch.float32))


@needs_cc
@pytest.mark.usefixtures("fresh_kernel")
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_broken_cache_file_is_rebuilt(monkeypatch, tmp_path, damage):
    good = _cbuild.library_path(ckernel.SOURCE).read_bytes() if ckernel.library() is not None else None
    if good is None:
        pytest.skip(f"the kernel does not build here: {ckernel.unavailable_reason()}")
    ckernel.reset()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = _cbuild.library_path(ckernel.SOURCE)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an ELF file" if damage == "garbage" else good[: len(good) // 2])
    assert ckernel.library() is not None, ckernel.unavailable_reason()
    assert path.read_bytes() != (b"not an ELF file" if damage == "garbage" else good[: len(good) // 2])
    out = torch.empty(128)
    packed = torch.arange(64, dtype=torch.uint8)
    assert ckernel.dequant4(packed, torch.tensor([2.0, 0.5]), 64, "nf4", 0, 128, out)
    assert torch.equal(out, naive(packed, torch.tensor([2.0, 0.5]), 128, 64, "nf4", torch.float32))


@needs_cc
@pytest.mark.usefixtures("fresh_kernel")
def test_parallel_first_builds_each_get_a_whole_file(monkeypatch, tmp_path):
    """Two builders into an empty cache at once (as pytest workers or two processes do; threads here,
    past the in-process lock, to keep the test fast): both load a kernel, no temporary is left."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: _cbuild.load(ckernel.SOURCE, ckernel._setup), range(2)))
    assert all(lib is not None for lib, _ in results), results
    names = sorted(f.name for f in (tmp_path / "lorakit").iterdir())
    assert len(names) == 2 and names[0].endswith(".so") and names[1] == names[0] + ".sha256"


@needs_cc
@pytest.mark.usefixtures("fresh_kernel")
def test_shared_writable_cache_is_not_loaded(monkeypatch, tmp_path):
    (tmp_path / "lorakit").mkdir()
    (tmp_path / "lorakit").chmod(0o777)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ckernel.library() is None and "writable by other users" in ckernel.unavailable_reason()
    q = nf4.quantize(torch.randn(256))
    assert torch.equal(q.dequantize(), naive(q.packed, q.absmax, 256, 64, "nf4", torch.float32))


@needs_cc
@pytest.mark.usefixtures("fresh_kernel")
def test_double_quant_absmax_decode_matches_numpy():
    q = nf4.quantize(torch.randn(64 * 700 + 17), double_quant=True)  # 701 blocks: a short 8-bit block
    st = q.stats.q
    c_vals = ckernel.dequant8(st.codes, st.absmax, st.blocksize, True)
    np_vals = torch.from_numpy(st._dequantize_numpy(np.asarray(F.create_dynamic_map(signed=True).float())))
    assert c_vals is not None and torch.equal(c_vals, np_vals)
    assert torch.equal(q.absmax, naive_double_quant_absmax(q))


@needs_cc
@pytest.mark.usefixtures("fresh_kernel")
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_serves_whole_weight_and_tiles(monkeypatch, dtype):
    """The default paths really go through the kernel (the parity tests above would pass on numpy too)."""
    served = []
    real = ckernel.dequant4
    monkeypatch.setattr(ckernel, "dequant4", lambda *a, **k: served.append(real(*a, **k)) or served[-1])
    q = nf4.quantize(torch.randn(96, 128), double_quant=True)
    q.dequantize(dtype)
    autograd4.TiledDequantLinear4.apply(torch.randn(2, 128, dtype=dtype), q.layout, dtype, *q.tensors().values())
    expect = dtype == torch.float32 or ckernel.simd_available()
    assert len(served) >= 2 and all(s == expect for s in served)
