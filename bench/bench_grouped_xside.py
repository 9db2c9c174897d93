"""An idea evaluated and NOT adopted (docs/PERFORMANCE.md, eighth landing): sharing the x-side work of
the projections that read one x (q/k/v; gate/up) — one rank-3r GEMM x·[A_q; A_k; A_v]ᵀ, one ∂A, one ∂x
— against lorakit's fused per-projection path, on SmolLM2-135M's shapes (N = 1024, in 576, r = 16).

    python bench/bench_grouped_xside.py --dropout 0.05 --rounds 40
    python bench/bench_grouped_xside.py --dropout 0 --rounds 40

Modes, interleaved per round (order rotating), CPU time of forward + backward on one thread:
floor (frozen GEMMs, input gradient only), fused (lorakit today: one mask per projection, PEFT's
semantics), fused-shared (one mask for the group, ``share_dropout_masks``'s option) and grouped (a
prototype written here: one node for the group's x-side work, then per projection
y = x Wᵀ + xa Bᵀ; it needs the shared mask). Ratios: medians of per-round ratios (interquartile range).
"""
import argparse
import statistics
import time

import torch

from lorakit.layers.branch import _dropped, lora_linear_fused
from lorakit.layers.seeded_dropout import draw

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--dropout", type=float, default=0.05)
ap.add_argument("--rounds", type=int, default=40)
ap.add_argument("--tokens", type=int, default=1024)
cli = ap.parse_args()
torch.set_num_threads(1)
N, P, ROUNDS = cli.tokens, cli.dropout, cli.rounds
r, s = 16, 2.0

class GroupA(torch.autograd.Function):
    """The group's x-side work in one node."""
    # xa_all = s·(x⊙m) A_allᵀ ; A_all (R, in) from cat
    @staticmethod
    def forward(ctx, x, mask, a_all, s):
        x2 = x.reshape(-1, x.shape[-1])
        if mask is not None:
            xd = _dropped(mask, x, x2, overwrite=False)
            s = s * mask.scale
        else:
            xd = x2
        xa = (xd @ a_all.T).mul_(s)
        ctx.save_for_backward(x, a_all)
        ctx.mask, ctx.s = mask, s
        return xa
    @staticmethod
    def backward(ctx, gxa):
        x, a_all = ctx.saved_tensors
        mask, s = ctx.mask, ctx.s
        x2 = x.reshape(-1, x.shape[-1])
        gxa = gxa * s
        gx = torch.mm(gxa, a_all)
        if mask is not None:
            mask.drop(gx, gx)
            xd = _dropped(mask, x, x2)
        else:
            xd = x2
        ga = gxa.T @ xd
        return gx.view(x.shape), None, ga, None

class FusedB(torch.autograd.Function):
    # y = x Wᵀ + xa Bᵀ
    @staticmethod
    def forward(ctx, x, xa, w, b):
        out = torch.mm(xa, b.T)
        out.addmm_(x.reshape(-1, x.shape[-1]), w.T)
        ctx.save_for_backward(x, xa, w, b)
        return out
    @staticmethod
    def backward(ctx, g):
        x, xa, w, b = ctx.saved_tensors
        gb = (xa.T @ g).T
        gxa = g @ b
        gx = g @ w
        return gx, gxa, None, gb

def make(outs, fin=576):
    torch.manual_seed(0)
    ws = [torch.randn(o, fin) * 0.02 for o in outs]
    As = [torch.randn(r, fin, requires_grad=True) for o in outs]
    Bs = [torch.randn(o, r, requires_grad=True) for o in outs]
    x = torch.randn(N, fin, requires_grad=True)
    gs = [torch.randn(N, o) for o in outs]
    return ws, As, Bs, x, gs

def floor(ws, As, Bs, x, gs):
    ys = [x @ w.T for w in ws]
    torch.autograd.backward(ys, gs)

def fused(ws, As, Bs, x, gs, shared=False, m0=None):
    m0 = m0 if m0 is not None else draw(x, P) if P > 0 else None
    ys = [lora_linear_fused(x, w, None, a, b, s, m0 if shared else (draw(x, P) if P > 0 else None))
          for w, a, b in zip(ws, As, Bs)]
    torch.autograd.backward(ys, gs)

def grouped(ws, As, Bs, x, gs, m0=None):
    m0 = m0 if m0 is not None else draw(x, P) if P > 0 else None
    xa_all = GroupA.apply(x, m0, torch.cat(As), s)
    ys, o = [], 0
    for w, a, b in zip(ws, As, Bs):
        ys.append(FusedB.apply(x, xa_all[:, o:o + a.shape[0]], w, b))
        o += a.shape[0]
    torch.autograd.backward(ys, gs)

def grads(fn, st, m0):
    fn(*st, m0=m0)
    out = [t.grad.clone() for t in [st[3], *st[1], *st[2]]]
    for t in [st[3], *st[1], *st[2]]:
        t.grad = None
    return out


for name, outs in [("qkv", [576, 192, 192]), ("gate/up", [1536, 1536])]:
    st = make(outs)
    # the prototype computes the same gradients as lorakit's fused path with one shared mask
    m0 = draw(st[3], P) if P > 0 else None
    for got, want in zip(grads(grouped, st, m0), grads(lambda *a, m0: fused(*a, shared=True, m0=m0), st, m0)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-3 * want.abs().max().item()), name
    fns = {"floor": floor, "fused": fused, "fused-shared": lambda *a: fused(*a, shared=True), "grouped": grouped}
    times = {k: [] for k in fns}
    for rd in range(ROUNDS + 2):
        keys = list(fns)[rd % 4:] + list(fns)[:rd % 4]
        for k in keys:
            t = time.process_time()
            fns[k](*st)
            dt = time.process_time() - t
            st[3].grad = None
            for p in st[1] + st[2]:
                p.grad = None
            if rd >= 2:
                times[k].append(dt)
    fl = times["floor"]
    print(f"{name} p={P}: " + "  ".join(f"{k} {1e3*statistics.median(v):.2f}ms" for k, v in times.items()))
    for k in ("fused", "fused-shared", "grouped"):
        rat = [a / b for a, b in zip(times[k], fl)]
        q = statistics.quantiles(rat, n=4)
        print(f"   {k}/floor {statistics.median(rat):.3f} ({q[0]:.3f}-{q[2]:.3f})  overhead ms {1e3*(statistics.median(times[k])-statistics.median(fl)):.2f}")
    rat = [a / b for a, b in zip(times["grouped"], times["fused-shared"])]
    print(f"   grouped/fused-shared {statistics.median(rat):.3f}")
