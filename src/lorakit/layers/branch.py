"""The LoRA branch of a linear layer as one autograd function.

    y = base(x) + s · (x_d Aᵀ) Bᵀ            x_d: (N, in)  A: (r, in)  B: (out, r)

Written by hand rather than as three autograd ops so that

* only rank-sized intermediates are created and saved: ``xa = s·x_d Aᵀ`` (N, r), besides x_d, which
  the caller shares between the projections that read the same input;
* the scaling s is applied to the (N, r) tensor, never to an (N, out) one;
* the add into the base output is fused into the second GEMM (``addmm_`` writes into base(x));
* backward computes ``g B`` (N, r) once and reuses it for both dA and dx.

Nothing of size out × in is ever built (ΔW is only materialised by merges).
"""

from __future__ import annotations

import torch


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base_out, x, a, b, scaling):
        # base_out: (..., out), x: (..., in). Compute in base_out's dtype (bf16 under autocast).
        dt = base_out.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dt)  # (N, in)
        a_, b_ = a.to(dt), b.to(dt)
        xa = (x2 @ a_.T).mul_(scaling)  # (N, r)
        out2 = base_out.view(-1, base_out.shape[-1])  # (N, out), same storage as base_out
        out2.addmm_(xa, b_.T)
        ctx.mark_dirty(base_out)
        ctx.save_for_backward(x, xa, a, b)
        ctx.scaling = scaling
        return base_out

    @staticmethod
    def backward(ctx, g):
        x, xa, a, b = ctx.saved_tensors
        s = ctx.scaling
        dt = g.dtype
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        need_x, need_a, need_b = ctx.needs_input_grad[1:4]
        grad_x = grad_a = grad_b = None
        if need_b:
            grad_b = (xa.T @ g2).T.to(b.dtype)  # (out, r); this operand order is the faster GEMM on MKL
        if need_x or need_a:
            gxa = (g2 @ b.to(dt)).mul_(s)  # (N, r)
            if need_a:
                grad_a = (gxa.T @ x.reshape(-1, x.shape[-1]).to(dt)).to(a.dtype)  # (r, in)
            if need_x:
                grad_x = (gxa @ a.to(dt)).view(x.shape).to(x.dtype)  # (..., in)
        return g, grad_x, grad_a, grad_b, None


def lora_linear_branch(base_out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       scaling: float) -> torch.Tensor:
    """``base_out + scaling · (x Aᵀ) Bᵀ`` for linear-like bases; may write into ``base_out``."""
    if not base_out.is_contiguous() or base_out._base is not None:
        # The fused in-place add needs its own contiguous storage (e.g. Conv1D returns a view).
        base_out = base_out.contiguous() if not base_out.is_contiguous() else base_out.clone()
    return _LoraLinear.apply(base_out, x, a, b, float(scaling))
