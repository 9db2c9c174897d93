"""The LoRA branch of a linear layer, with its dropout, as one autograd function.

    y = base(x) + s · ((x ⊙ m) Aᵀ) Bᵀ        x: (N, in)  m: dropout mask or None  A: (r, in)  B: (out, r)

Two forms, one formula: ``lora_linear_branch`` adds the branch to a base output computed by the base
module (any linear-like base: Linear, GPT-2 Conv1D, a quantized linear), and ``lora_linear_fused``
computes a plain ``nn.Linear`` base's product in the same node (``y = x Wᵀ + b + branch``), which saves
two memory-bound passes per projection: the branch is written first and the frozen GEMM accumulates onto
it (``addmm_`` with β = 1, inside MKL's compute-bound kernel) instead of a separate read-modify-write
of (N, out); and in backward the base's ∂x = g W is accumulated onto the branch's ∂x the same way
instead of autograd summing two (N, in) tensors (docs/PERFORMANCE.md, seventh landing).

Written by hand rather than as autograd ops so that

* only rank-sized tensors are created and saved: ``xa = s·(x⊙m) Aᵀ`` (N, r); x itself is saved by
  reference (the sibling projections that read the same x share it), and of the dropout mask only
  its seed (a ``SeededMask``, CPU: each use of m is one pass of the C kernel) or, on the dense path,
  its bits (N·in/8 bytes, ``dropout.pack_keep``), so no dropped copy of x is stored — backward
  recomputes x⊙m for dA;
* ∂x is returned in a buffer of its own (not a view), so autograd adds the base's and the sibling
  projections' ∂x into it in place (a view would make it allocate a sum);
* s is applied to the (N, r) tensor, never to an (N, out) one;
* backward computes g·B (N, r) once and reuses it for both dA and dx.

Nothing of size out × in is ever built (ΔW is only materialised by merges).
"""

from __future__ import annotations

import contextlib

import torch

from .dropout import pack_keep, unpack_keep
from .scratch import scratch
from .seeded_dropout import SeededMask

_FUSION = {"on": True}


def set_fusion(on: bool) -> bool:
    """Let ``LinearKind.can_fuse`` fuse (True, the default) or never (False: benches' A/B, tests of the
    unfused path on plain Linears); returns the old value."""
    was, _FUSION["on"] = _FUSION["on"], bool(on)
    return was


def fusion_enabled() -> bool:
    return _FUSION["on"]


def _autocast_off():
    # The branch computes in one dtype with autocast off (see forward). Entering torch.autocast costs
    # ~8 µs a device even when it is already off, so it is entered only when autocast is on.
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast("cpu", enabled=False))
        stack.enter_context(torch.autocast("cuda", enabled=False))
        return stack
    return contextlib.nullcontext()


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base_out, x, mask, a, b, scaling, weight, bias):
        # base_out: (..., out), the base's output, or None: fused, the base is x Wᵀ + bias with
        # weight (out, in) and bias (out,) or None, computed here. x: (..., in).
        with _autocast_off():
            return _forward(ctx, base_out, x, mask, a, b, scaling, weight, bias)

    @staticmethod
    def backward(ctx, g):
        with _autocast_off():
            return _backward(ctx, g)


def _forward(ctx, base_out, x, mask, a, b, scaling, weight, bias):
    # Compute in base_out's dtype (bf16 under autocast), with autocast off: it would turn x2 @ A into
    # bf16 while a base that returns fp32 (QuantLinear casts back to x's dtype) leaves out2 fp32, and
    # the in-place addmm_ is not autocast. Fused: x's dtype, which the caller checked is W's.
    fused = base_out is None
    dt = x.dtype if fused else base_out.dtype
    x2 = x.reshape(-1, x.shape[-1]).to(dt)  # (N, in)
    seeded = mask if isinstance(mask, SeededMask) else None
    if seeded is not None:
        # read by the GEMM below, then free; 1/(1−p) goes onto xa. Fused, x2 is read again by the
        # base GEMM, so it must not be overwritten.
        xd = _dropped(seeded, x, x2, overwrite=not fused)
        scaling_eff = scaling * seeded.scale
    else:
        xd = x2 if mask is None else x2 * mask.reshape(x2.shape).to(dt)  # (N, in), a temporary
        scaling_eff = scaling
    xa = (xd @ a.to(dt).T).mul_(scaling_eff)  # (N, r)
    del xd
    if fused:
        # branch first (+ bias), then the frozen GEMM accumulates onto it: (N, out)
        out2 = torch.mm(xa, b.to(dt).T) if bias is None else torch.addmm(bias.to(dt), xa, b.to(dt).T)
        out2.addmm_(x2, weight.T)
        out = out2.view(*x.shape[:-1], out2.shape[-1])
    else:
        out2 = base_out.view(-1, base_out.shape[-1])  # (N, out), same storage as base_out
        out2.addmm_(xa, b.to(dt).T)
        ctx.mark_dirty(base_out)
        out = base_out
    ctx.seeded, ctx.fused = seeded, fused
    if seeded is not None or mask is None:
        ctx.keep_scale, saved_mask = None, None
    else:
        # A mask from dropout_mask() carries its bool form: keep that, packed to bits on CPU (1/32 of
        # the float mask), and rebuild a 0/1 mask in backward, with 1/(1−p) folded into the rank-sized
        # gradient. Any other mask is kept as it is.
        keep = getattr(mask, "lorakit_keep", None)
        ctx.keep_scale = getattr(mask, "lorakit_scale", None) if keep is not None else None
        saved_mask = mask if keep is None else pack_keep(keep)
    ctx.save_for_backward(x, saved_mask, xa, a, b, weight)
    ctx.scaling = scaling
    return out


def _backward(ctx, g):
    x, saved_mask, xa, a, b, weight = ctx.saved_tensors
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
    need_x, _, need_a, need_b, _, need_w, need_bias = ctx.needs_input_grad[1:8]
    grad_x = grad_a = grad_b = grad_w = grad_bias = None
    if need_w:  # a trainable base weight (not LoRA's usual case): ∂W = gᵀ x, before x2 may be overwritten
        grad_w = (g2.T @ x2).to(weight.dtype)
    if need_bias:  # e.g. bias="all"
        grad_bias = g2.sum(0).to(dt)
    if need_b:
        grad_b = (xa.T @ g2).T.to(b.dtype)  # (out, r); this operand order is the faster GEMM on MKL
    if need_x or need_a:
        gxa = (g2 @ b.to(dt)).mul_(s)  # (N, r)
        if need_x:
            # Allocated in x's shape, not a view of it: autograd then adds the base layer's (and the
            # sibling projections') ∂x into this buffer in place instead of into a new one.
            gx = torch.empty(x.shape, dtype=dt, device=x.device)
            gx2 = gx.view(x2.shape)
            torch.mm(gxa, a.to(dt), out=gx2)  # (N, in)
            if seeded is not None:
                seeded.drop(gx, gx)  # ∂x ⊙ keep, in place
            elif mask is not None:
                gx2.mul_(mask)
            if ctx.fused:
                gx2.addmm_(g2, weight)  # + the base's ∂x = g W, accumulated inside the GEMM
            grad_x = gx.to(x.dtype)
        if need_a:
            # x ⊙ m, written over the 0/1 mask when backward owns it (no other (N, in) buffer)
            if seeded is not None:
                xd = _dropped(seeded, x, x2)  # read by the ∂A GEMM below only
            else:
                xd = x2 if mask is None else mask.mul_(x2) if own else x2 * mask
            grad_a = (gxa.T @ xd).to(a.dtype)  # (r, in)
    # Hand the base layer the contiguous gradient, so its backward does not copy it a second time.
    grad_base = None if ctx.fused else g2.view(g.shape)
    return grad_base, grad_x, None, grad_a, grad_b, None, grad_w, grad_bias


def _dropped(seeded: SeededMask, x: torch.Tensor, x2: torch.Tensor, overwrite: bool = True) -> torch.Tensor:
    """x ⊙ keep (N, in) in one pass: over x2 when the cast or a contiguous copy already made it a
    buffer of ours (and ``overwrite``), else into the reused per-thread buffer (scratch.py). Valid
    until the next use."""
    x2 = x2.contiguous()
    ours = overwrite and x2.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    return seeded.drop(x2, x2 if ours else scratch(x2))


def lora_linear_branch(base_out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       scaling: float, mask: torch.Tensor | SeededMask | None = None) -> torch.Tensor:
    """``base_out + scaling · ((x ⊙ mask) Aᵀ) Bᵀ`` for linear-like bases; may write into ``base_out``.
    ``mask``: a dense mask of x's shape, a ``SeededMask`` (``dropout.draw_mask``) or None."""
    if not base_out.is_contiguous() or base_out._base is not None:
        # The fused in-place add needs its own contiguous storage (e.g. Conv1D returns a view).
        base_out = base_out.contiguous() if not base_out.is_contiguous() else base_out.clone()
    return _LoraLinear.apply(base_out, x, mask, a, b, float(scaling), None, None)


def lora_linear_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                      b: torch.Tensor, scaling: float, mask: torch.Tensor | SeededMask | None = None) -> torch.Tensor:
    """``x Wᵀ + bias + scaling · ((x ⊙ mask) Aᵀ) Bᵀ`` in one autograd node, for an ``nn.Linear`` base
    (weight (out, in)) whose dtype and device are x's, with autocast off (``LinearKind.can_fuse``)."""
    return _LoraLinear.apply(None, x, mask, a, b, float(scaling), weight, bias)
