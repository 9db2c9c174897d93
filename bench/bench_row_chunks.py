"""Prototype, not kept: the branch's mask passes and rank-16 GEMMs done in row chunks, so each chunk of
x ⊙ m is still in L2 (2 MiB here) when its GEMM reads it, against lorakit's fused branch (issue 15 §1,
docs/PERFORMANCE.md "Seventh pass").

    python bench/bench_row_chunks.py --rounds 20 --chunk 256

One projection fwd + bwd, N = 1024, r = 16, p = 0.05, SmolLM2's shapes, one thread, CPU time; a 48 MB
fill between forward and backward stands for the rest of the model evicting the caches. Timing only:
each chunk draws its own seeded mask (same cost, other bits than lorakit's one mask), so its gradients
are not lorakit's. Floor, fused and chunked interleave; the ratio is the median of per-round ratios.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lorakit.layers import seeded_dropout as sd
from lorakit.layers.branch import lora_linear_fused

ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=30)
ap.add_argument("--chunk", type=int, default=128)
ap.add_argument("--shapes", default="576x576,576x192,576x1536,1536x576")
ap.add_argument("--p", type=float, default=0.05)
ap.add_argument("--noflush", action="store_true")
args = ap.parse_args()
torch.set_num_threads(1)
N, r, s = 1024, 16, 2.0
FLUSH = torch.empty(48 << 18)  # 48 MB


def flush():
    if not args.noflush:
        FLUSH.fill_(1.0)


class Chunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, w, masks, C):
        x2 = x.reshape(-1, x.shape[-1])
        n, din = x2.shape
        xa = torch.empty(n, a.shape[0])
        buf = torch.empty(C, din)
        for i, c0 in enumerate(range(0, n, C)):
            c1 = min(n, c0 + C)
            bb = buf[: c1 - c0]
            if masks is not None:
                masks[i].drop(x2[c0:c1], bb)
                torch.mm(bb, a.T, out=xa[c0:c1])
            else:
                torch.mm(x2[c0:c1], a.T, out=xa[c0:c1])
        scale = s * (masks[0].scale if masks is not None else 1.0)
        xa.mul_(scale)
        out = torch.mm(xa, b.T)
        out.addmm_(x2, w.T)
        ctx.save_for_backward(x, xa, a, b, w)
        ctx.masks, ctx.C, ctx.scale = masks, C, scale
        return out

    @staticmethod
    def backward(ctx, g):
        x, xa, a, b, w = ctx.saved_tensors
        masks, C = ctx.masks, ctx.C
        x2 = x.reshape(-1, x.shape[-1])
        n, din = x2.shape
        grad_b = (xa.T @ g).T
        gxa = (g @ b).mul_(ctx.scale)
        gx = torch.empty_like(x2)
        grad_a = torch.zeros_like(a)
        buf = torch.empty(C, din)
        for i, c0 in enumerate(range(0, n, C)):
            c1 = min(n, c0 + C)
            gc = gx[c0:c1]
            torch.mm(gxa[c0:c1], a, out=gc)
            if masks is not None:
                masks[i].drop(gc, gc)
                bb = buf[: c1 - c0]
                masks[i].drop(x2[c0:c1], bb)
            else:
                bb = x2[c0:c1]
            grad_a.addmm_(gxa[c0:c1].T, bb)
        gx.addmm_(g, w)
        return gx, grad_a, grad_b, None, None, None


def setup(din, dout):
    torch.manual_seed(0)
    x = torch.randn(N, din, requires_grad=True)
    w = torch.randn(dout, din) / din**0.5
    a = (torch.randn(r, din) / din**0.5).requires_grad_()
    b = (torch.randn(dout, r) * 0.01).requires_grad_()
    g = torch.randn(N, dout)
    return x, w, a, b, g


def run(mode, x, w, a, b, g):
    x.grad = a.grad = b.grad = None
    flush()
    t0 = time.process_time()
    if mode == "floor":
        y = F.linear(x, w)
    elif mode == "fused":
        m = sd.draw(x, args.p) if args.p else None
        y = lora_linear_fused(x, w, None, a, b, s, m)
    else:
        C = args.chunk
        ms = [sd.draw(x[:C], args.p) for _ in range(0, N, C)] if args.p else None
        y = Chunked.apply(x, a, b, w, ms, C)
    t1 = time.process_time()
    flush()
    t2 = time.process_time()
    y.backward(g)
    t3 = time.process_time()
    return (t1 - t0) + (t3 - t2)


for shp in args.shapes.split(","):
    din, dout = map(int, shp.split("x"))
    t = setup(din, dout)
    modes = ["floor", "fused", "chunked"]
    res = {m: [] for m in modes}
    for _ in range(3):
        for m in modes:
            run(m, *t)
    for k in range(args.rounds):
        for m in modes[k % 3:] + modes[: k % 3]:
            res[m].append(run(m, *t) * 1e3)
    fl = statistics.median(res["floor"])
    fu = statistics.median(res["fused"])
    ch = statistics.median(res["chunked"])
    rat = sorted(c / f for c, f in zip(res["chunked"], res["fused"]))
    q = statistics.quantiles(rat, n=4)
    print(f"{din}->{dout} C={args.chunk} p={args.p}: floor {fl:.2f} fused +{fu-fl:.2f} chunked +{ch-fl:.2f} ms;"
          f" chunked/fused {statistics.median(rat):.3f} ({q[0]:.3f}-{q[2]:.3f})", flush=True)
