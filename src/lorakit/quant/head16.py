"""A frozen output head (and its input embedding) kept in 16 bit, never whole in the compute dtype.

QLoRA keeps the head and embeddings out of 4 bit (§3) but nothing says they must be fp32: with fp32
compute a small model's tied embedding/head is its biggest tensor (SmolLM2-135M: 49,152 × 576 =
113 MB in fp32, as much as two of its NF4 copies). Frozen, it can stay in bf16 (57 MB):

    FrozenEmbedding   ids (...,) → W[ids] upcast to the compute dtype (only the looked-up rows)
    FrozenHead        x (..., H) → x Wᵀ (+ b), W read in row tiles upcast one at a time, in forward
                      and backward (no (V, H) fp32 copy); ``weight_tiles`` lets
                      ``lorakit.losses.chunked_cross_entropy`` run its online softmax over the tiles

The values are those of the bf16-rounded weights computed in the compute dtype. A tied pair shares
one 16-bit tensor. Only frozen heads qualify: a head that trains (``modules_to_save``, trainable
tokens, a LoRA on ``lm_head`` or on a tied embedding) keeps its module and dtype —
:func:`keep_head_16bit` leaves it alone and says why.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .keep_dtype import apply_keeping_dtype

#: W rows upcast at a time in ``FrozenHead.forward`` (fp32: 2 M elements = 8 MB).
TILE_ELEMENTS = 1 << 21


def _tile_rows(cols: int) -> int:
    return max(1, TILE_ELEMENTS // max(cols, 1))


class _Frozen16(nn.Module):
    """Holds the 16-bit weight as a buffer (``state_dict`` key ``weight`` as before) that ``.to(dtype)``
    does not cast; ``compute_dtype`` is what forward returns."""

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight)
        self.compute_dtype = compute_dtype
        self._tag()

    def _tag(self) -> None:
        self.weight._lorakit_params = self.weight.numel()  # counted as the model's parameters

    def _apply(self, fn, recurse=True):
        try:
            apply_keeping_dtype(self, ["weight"], fn, lambda: super(_Frozen16, self)._apply(fn, recurse))
        finally:
            self._tag()
        return self


class FrozenEmbedding(_Frozen16):
    """``nn.Embedding`` replacement over a frozen 16-bit table: a lookup upcasts only the rows read."""

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype, padding_idx: int | None = None):
        super().__init__(weight, compute_dtype)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx).to(self.compute_dtype)  # (..., H)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight={self.weight.dtype}, out={self.compute_dtype}"


class FrozenHead(_Frozen16):
    """``nn.Linear`` replacement for a frozen output head held in 16 bit (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__(weight, compute_dtype)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype).clone())

    def weight_tiles(self, dtype: torch.dtype, rows: int):
        """(v0, v1, W[v0:v1] in ``dtype``) for v0 = 0, rows, 2·rows, … (the chunked CE's tile protocol).

        Every tile is upcast into one reused buffer (valid until the next tile is drawn): a fresh
        multi-MB tensor per tile would keep two tiles alive at the handover and pay page faults."""
        w = self.weight
        if w.dtype == dtype:
            for v0 in range(0, w.shape[0], rows):
                yield v0, min(v0 + rows, w.shape[0]), w[v0:v0 + rows]
            return
        buf = torch.empty(min(rows, w.shape[0]), w.shape[1], dtype=dtype, device=w.device)
        for v0 in range(0, w.shape[0], rows):
            v1 = min(v0 + rows, w.shape[0])
            yield v0, v1, buf[:v1 - v0].copy_(w[v0:v1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.is_floating_point() else self.compute_dtype
        out = _TiledLinear.apply(x.to(dtype), self, dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={self.weight.dtype}, compute_dtype={self.compute_dtype}")


class _TiledLinear(torch.autograd.Function):
    """``x Wᵀ`` with W upcast a tile of rows at a time; only x's gradient (W is frozen)."""

    @staticmethod
    def forward(ctx, x, head, dtype):
        ctx.head, ctx.dtype = head, dtype
        out = x.new_empty(*x.shape[:-1], head.out_features)  # (..., V)
        for v0, v1, w in head.weight_tiles(dtype, _tile_rows(head.in_features)):
            out[..., v0:v1] = F.linear(x, w)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        grad_x = None
        for v0, v1, w in ctx.head.weight_tiles(ctx.dtype, _tile_rows(ctx.head.in_features)):
            part = grad_out[..., v0:v1].to(ctx.dtype) @ w  # (..., V_t) @ (V_t, H) → (..., H)
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None, None


def keep_head_16bit(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> str:
    """Replace ``model``'s frozen output head (``get_output_embeddings()``) and frozen input embedding
    by 16-bit :class:`FrozenHead` / :class:`FrozenEmbedding` in place (a tied pair shares one tensor).

    Call it after ``lorakit.inject``: a head or embedding that trains or carries an adapter is left as
    it is (and with it its tied partner). Returns a one-line account of what was done (or why not).
    """
    if dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(f"keep_head_16bit: dtype={dtype}; use torch.bfloat16 (or torch.float16).")
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    head = get_out() if callable(get_out) else None
    emb = get_in() if callable(get_in) else None
    plans: list[tuple[str, nn.Module]] = []  # (kind, module) to replace
    reasons: list[str] = []
    for kind, module, cls in (("head", head, nn.Linear), ("embedding", emb, nn.Embedding)):
        if module is None:
            continue
        if type(module) is not cls:
            reasons.append(f"the {kind} is a {type(module).__name__} (an adapter or a trained kind), kept")
        elif any(p.requires_grad for p in module.parameters()):
            reasons.append(f"the {kind} trains, kept in {module.weight.dtype}")
        elif module.weight.dtype.itemsize <= 2:
            reasons.append(f"the {kind} is already {module.weight.dtype}")
        else:
            plans.append((kind, module))
    tied = head is not None and emb is not None and _same_weight(head, emb)
    if tied and len(plans) != 2:  # both or neither: converting one would untie them (two copies)
        plans = []
        reasons.append("head and embedding are tied, so both stay")
    if not plans:
        return "16-bit head: nothing converted (" + "; ".join(reasons or ["no head or embedding"]) + ")."
    shared: torch.Tensor | None = None
    done = []
    for kind, module in plans:
        w16 = shared if (tied and shared is not None) else module.weight.detach().to(dtype)
        shared = w16
        compute = module.weight.dtype
        if kind == "head":
            new: nn.Module = FrozenHead(w16, module.bias, compute)
        else:
            new = FrozenEmbedding(w16, compute, module.padding_idx)
        _replace(model, module, new)
        done.append(kind)
    _rehook_input_grads(model)
    what = " and ".join(done) + (" (tied: one tensor)" if tied else "")
    return f"16-bit head: {what} kept frozen in {str(dtype).removeprefix('torch.')}, upcast tile by tile."


def _same_weight(a: nn.Module, b: nn.Module) -> bool:
    wa, wb = getattr(a, "weight", None), getattr(b, "weight", None)
    if wa is None or wb is None:
        base_a = getattr(a, "base_layer", a)
        base_b = getattr(b, "base_layer", b)
        wa, wb = getattr(base_a, "weight", None), getattr(base_b, "weight", None)
    return wa is not None and wa is wb


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    hits = [n for n, m in model.named_modules(remove_duplicate=False) if m is old]
    for path in hits:
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)


def _rehook_input_grads(model: nn.Module) -> None:
    # transformers' enable_input_require_grads hooks the embedding module object; the new one needs it too.
    if getattr(model, "_require_grads_hook", None) is not None and callable(getattr(model, "enable_input_require_grads", None)):
        model.disable_input_require_grads()
        model.enable_input_require_grads()
