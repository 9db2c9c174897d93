"""The LoRA branch of a linear layer, with its dropout, as one autograd function.

    y = base(x) + s · ((x ⊙ m) Aᵀ) Bᵀ        x: (N, in)  m: dropout mask or None  A: (r, in)  B: (out, r)

Written by hand rather than as autograd ops so that

* only rank-sized tensors are created and saved: ``xa = s·(x⊙m) Aᵀ`` (N, r); x itself is saved by
  reference (the sibling projections that read the same x share it), and of the dropout mask only
  its seed (a ``SeededMask``, CPU: each use of m is one pass of the C kernel) or, on the dense path,
  its bits (N·in/8 bytes, ``dropout.pack_keep``), so no dropped copy of x is stored — backward
  recomputes x⊙m for dA;
* ∂x is returned in a buffer of its own (not a view), so autograd adds the base's and the sibling
  projections' ∂x into it in place (a view would make it allocate a sum);
* s is applied to the (N, r) tensor, never to an (N, out) one;
* the add into the base output is fused into the second GEMM (``addmm_`` writes into base(x));
* backward computes g·B (N, r) once and reuses it for both dA and dx.

Nothing of size out × in is ever built (ΔW is only materialised by merges).
"""

from __future__ import annotations

import torch

from .dropout import pack_keep, unpack_keep
from .scratch import scratch
from .seeded_dropout import SeededMask


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    @torch.autocast("cpu", enabled=False)
    @torch.autocast("cuda", enabled=False)
    def forward(ctx, base_out, x, mask, a, b, scaling):
        # base_out: (..., out), x: (..., in). Compute in base_out's dtype (bf16 under autocast), with
        # autocast off: it would turn x2 @ A into bf16 while a base that returns fp32 (QuantLinear
        # casts back to x's dtype) leaves out2 fp32, and the in-place addmm_ is not autocast.
        dt = base_out.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dt)  # (N, in)
        seeded = mask if isinstance(mask, SeededMask) else None
        if seeded is not None:
            xd = _dropped(seeded, x, x2)  # read by the GEMM below, then free; 1/(1−p) goes onto xa
            scaling_eff = scaling * seeded.scale
        else:
            xd = x2 if mask is None else x2 * mask.reshape(x2.shape).to(dt)  # (N, in), a temporary
            scaling_eff = scaling
        xa = (xd @ a.to(dt).T).mul_(scaling_eff)  # (N, r)
        del xd
        out2 = base_out.view(-1, base_out.shape[-1])  # (N, out), same storage as base_out
        out2.addmm_(xa, b.to(dt).T)
        ctx.mark_dirty(base_out)
        ctx.seeded = seeded
        if seeded is not None:
            ctx.keep_scale = None
            ctx.save_for_backward(x, None, xa, a, b)
        else:
            # A mask from dropout_mask() carries its bool form: keep that, packed to bits on CPU (1/32
            # of the float mask), and rebuild a 0/1 mask in backward, with 1/(1−p) folded into the
            # rank-sized gradient. Any other mask is kept as it is.
            keep = getattr(mask, "lorakit_keep", None)
            ctx.keep_scale = getattr(mask, "lorakit_scale", None) if keep is not None else None
            ctx.save_for_backward(x, mask if keep is None else pack_keep(keep), xa, a, b)
        ctx.scaling = scaling
        return base_out

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    @torch.autocast("cuda", enabled=False)
    def backward(ctx, g):
        x, saved_mask, xa, a, b = ctx.saved_tensors
        s, dt, seeded = ctx.scaling, g.dtype, ctx.seeded
        g2 = g.reshape(-1, g.shape[-1])  # (N, out); a copy when g is strided (e.g. after attention)
        x2 = x.reshape(-1, x.shape[-1]).to(dt)  # (N, in)
        mask, own = None, False  # own: mask is a fresh tensor backward may overwrite
        if seeded is not None:
            s = s * seeded.scale
        elif saved_mask is not None and ctx.keep_scale is not None:
            mask, own, s = unpack_keep(saved_mask, x2.shape, dt), True, s * ctx.keep_scale  # 0/1
        elif saved_mask is not None:
            mask = saved_mask.reshape(x2.shape).to(dt)
        need_x, _, need_a, need_b = ctx.needs_input_grad[1:5]
        grad_x = grad_a = grad_b = None
        if need_b:
            grad_b = (xa.T @ g2).T.to(b.dtype)  # (out, r); this operand order is the faster GEMM on MKL
        if need_x or need_a:
            gxa = (g2 @ b.to(dt)).mul_(s)  # (N, r)
            if need_x:
                # Allocated in x's shape, not a view of it: autograd then adds the base layer's (and the
                # sibling projections') ∂x into this buffer in place instead of into a new one.
                gx = torch.empty(x.shape, dtype=dt, device=x.device)
                torch.mm(gxa, a.to(dt), out=gx.view(x2.shape))  # (N, in)
                if seeded is not None:
                    seeded.drop(gx, gx)  # ∂x ⊙ keep, in place
                elif mask is not None:
                    gx.view(x2.shape).mul_(mask)
                grad_x = gx.to(x.dtype)
            if need_a:
                # x ⊙ m, written over the 0/1 mask when backward owns it (no other (N, in) buffer)
                if seeded is not None:
                    xd = _dropped(seeded, x, x2)  # read by the ∂A GEMM below only
                else:
                    xd = x2 if mask is None else mask.mul_(x2) if own else x2 * mask
                grad_a = (gxa.T @ xd).to(a.dtype)  # (r, in)
        # Hand the base layer the contiguous gradient, so its backward does not copy it a second time.
        return g2.view(g.shape), grad_x, None, grad_a, grad_b, None


def _dropped(seeded: SeededMask, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """x ⊙ keep (N, in) in one pass: over x2 when the cast or a contiguous copy already made it a
    buffer of ours, else into the reused per-thread buffer (scratch.py). Valid until the next use."""
    x2 = x2.contiguous()
    ours = x2.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    return seeded.drop(x2, x2 if ours else scratch(x2))


def lora_linear_branch(base_out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       scaling: float, mask: torch.Tensor | SeededMask | None = None) -> torch.Tensor:
    """``base_out + scaling · ((x ⊙ mask) Aᵀ) Bᵀ`` for linear-like bases; may write into ``base_out``.
    ``mask``: a dense mask of x's shape, a ``SeededMask`` (``dropout.draw_mask``) or None."""
    if not base_out.is_contiguous() or base_out._base is not None:
        # The fused in-place add needs its own contiguous storage (e.g. Conv1D returns a view).
        base_out = base_out.contiguous() if not base_out.is_contiguous() else base_out.clone()
    return _LoraLinear.apply(base_out, x, mask, a, b, float(scaling))
