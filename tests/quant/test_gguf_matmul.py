"""The GGUF base's slab-wise matmul: output and input gradient equal the plain matmul with gguf's own
dequantized weight, over several slabs, and backward keeps only the packed bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf_helpers import QT, gguf, random_kquant

from lorakit.quant import gguf_matmul
from lorakit.quant.gguf_linear import gguf_linear


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"])
def test_slabs_match_dense_matmul(monkeypatch, qtype):
    rows, cols = 300, 512
    monkeypatch.setattr(gguf_matmul, "SLAB_ELEMENTS", 64 * cols)  # 5 slabs, the last one partial
    rng = np.random.default_rng(0)
    if qtype in ("Q4_K", "Q6_K"):
        raw = random_kquant(rows, cols, QT[qtype], rng)
    else:
        raw = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), QT[qtype])
    w = torch.from_numpy(gguf.quants.dequantize(raw, QT[qtype]).astype(np.float32))  # gguf's reference
    layer = gguf_linear(torch.from_numpy(raw), qtype, (rows, cols), compute_dtype=torch.float32)
    x = torch.randn(2, 7, cols, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y_ref = F.linear(x_ref, w)
    # the same products; only the fp32 summation order of the slab-wise backward may differ
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5 * x_ref.grad.abs().max().item())
    assert saved == [(torch.uint8, raw.size)]  # nothing dequantized is kept for backward
