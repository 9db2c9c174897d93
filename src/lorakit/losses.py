"""Cross-entropy over the vocabulary in chunks of tokens, without materialising the full logits.

A causal LM's last step is ``logits = h Wᵀ`` (h: (N, H) hidden states of N tokens, W: (V, H) the
output head) followed by cross-entropy. At V = 49,152 and N = 4 × 256 the fp32 logits are 200 MB, and
autograd keeps them (or their log-softmax) for backward, plus a gradient of the same size: for a small
model with a large vocabulary that is most of a step's activation memory.

Here the loss *and its gradients* are computed chunk by chunk in the forward pass (the idea of
Liger-Kernel's fused linear cross-entropy and of Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary
Language Models", arXiv 2411.09009, §3): for each chunk of C tokens

    z = h_c Wᵀ (+ b)                     (C, V)  fp32, freed after the chunk
    loss_c = Σ_valid (logsumexp(z) − z[y])
    g = softmax(z) − onehot(y)           (C, V)  zero on ignored rows
    ∂h_c = g W        ∂W += gᵀ h_c      (∂b += Σ g)

and only ∂h (N, H) — and ∂W when the head trains — is kept for backward, which scales them by the
incoming gradient. Peak extra memory is one (C, V) chunk instead of several (N, V) tensors; the FLOPs
are the unchunked ones (one forward and two gradient GEMMs per chunk).

A **frozen** head (a plain ``nn.Linear`` without trainable weights, or any head offering
``weight_tiles`` — lorakit.quant's 16-bit head and packed GGUF heads) never needs its whole weight in
the compute dtype: W is read in tiles of vocabulary rows W_t (V_t, H), each upcast or dequantized
once per call, and the softmax runs online across tiles (Milakov & Gimelshein 2018, "Online normalizer
calculation for softmax"; the rescaling flash attention uses), for every chunk of C tokens:

    z = h_c W_tᵀ (+ b_t)                                (C, V_t)  the only logits alive
    m' = max(m, max z)      s = s·e^(m−m') + Σ e^(z−m')
    a = a·e^(m−m') + e^(z−m') W_t                       (C, H)    unnormalised Σ softmax·W
    after the last tile:  loss_c = Σ_valid (m + log s − z[y]),   ∂h_c = a / s − W[y]

so the extra memory is one W tile, one (C, V_t) logits tile and (N, H) accumulators; the GEMMs are
the fused path's (one for the logits, one for ∂h). Its values equal the fused path's up to fp32
summation order. A trainable head (``modules_to_save``, full fine-tuning) keeps the fused path: ∂W
needs the final normaliser before any tile's gradient.

A head that is not a plain linear map (a LoRA-wrapped ``lm_head``, a quantized head without
``weight_tiles``) goes through the general path: each chunk runs under ``torch.utils.checkpoint``, so its logits are recomputed in backward
instead of kept (one extra head forward per step).

Use it from a training loop of your own::

    with lorakit.losses.hidden_states_instead_of_logits(model) as head:
        hidden = model(input_ids=ids, attention_mask=mask).logits        # (B, T, H): the head's input
    loss = lorakit.losses.chunked_cross_entropy(hidden[:, :-1], head, labels[:, 1:], reduction="mean")
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError

IGNORE_INDEX = -100
#: Elements of one fp32 logits chunk (C × V): 8 M elements = 32 MB whatever the vocabulary size.
CHUNK_ELEMENTS = 1 << 23
#: Frozen heads: elements of one upcast/dequantized W tile (V_t × H, 2 M = 8 MB in fp32) and of one
#: logits tile (C × V_t, 8 MB). Measured on SmolLM2 (bench/bench_ce_tiles.py): see docs/QUANT.md.
TILE_ELEMENTS = 1 << 21
LOGITS_TILE_ELEMENTS = 1 << 21


def default_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk so that one (C, V) fp32 chunk holds about :data:`CHUNK_ELEMENTS` elements."""
    return max(16, CHUNK_ELEMENTS // max(vocab_size, 1))


def frozen_weight_tiles(head: nn.Module):
    """``tiles(dtype, rows)`` → iterator of (v0, v1, W[v0:v1] in ``dtype``) for a frozen head, or None.

    The protocol: a head module may define ``weight_tiles`` (a method, or None when it cannot tile);
    a plain ``nn.Linear`` whose parameters are all frozen tiles by slicing its weight. A tile may be
    a reused buffer: it is valid until the next one is drawn."""
    if any(p.requires_grad for p in head.parameters()):
        return None
    tiles = getattr(head, "weight_tiles", None)
    if callable(tiles):
        return tiles
    if type(head) is nn.Linear:
        w = head.weight

        def linear_tiles(dtype: torch.dtype, rows: int):
            for v0 in range(0, w.shape[0], rows):
                yield v0, min(v0 + rows, w.shape[0]), w[v0:v0 + rows].to(dtype)

        return linear_tiles
    return None


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, *,
                          chunk_tokens: int | None = None, ignore_index: int = IGNORE_INDEX,
                          reduction: str = "sum", tile_rows: int | None = None) -> torch.Tensor:
    """Cross-entropy of ``head(hidden)`` against ``labels`` without the full logits.

    ``hidden`` (..., H) are the head's inputs, ``labels`` (...) the target ids (``ignore_index`` = no
    target; shift them yourself for next-token prediction). ``reduction`` is "sum" or "mean" (over the
    targets that are not ignored). Equal to ``F.cross_entropy(head(hidden).float(), labels)`` in value
    and gradients (up to fp32 summation order). ``chunk_tokens``: tokens per chunk; ``tile_rows``:
    vocabulary rows per W tile of a frozen head (default: :data:`TILE_ELEMENTS` / H). On the tiled
    path ``chunk_tokens`` defaults to :data:`LOGITS_TILE_ELEMENTS` / ``tile_rows``.
    """
    if reduction not in ("sum", "mean"):
        raise ConfigError(f"chunked_cross_entropy: reduction={reduction!r}; use 'sum' or 'mean'.")
    for name, value in (("chunk_tokens", chunk_tokens), ("tile_rows", tile_rows)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"chunked_cross_entropy: {name}={value!r}; give a positive integer (or None for "
                              "the default).")
    _check_inputs(hidden, head, labels, ignore_index)
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    y = labels.reshape(-1).to(h.device, torch.long)  # (N,)
    vocab = _vocab_size(head)
    known = _known_vocab(head)
    if known is not None and not torch.compiler.is_compiling():  # a host check: no data-dependent branch there
        _check_labels(y, known, ignore_index)
    # Under torch.compile a frozen head takes the untiled path: the tiled one checks its labels on the
    # host (a data-dependent branch that would break the graph) and iterates a Python tile generator.
    tiles = None if torch.compiler.is_compiling() else frozen_weight_tiles(head)
    if tiles is not None:
        rows = tile_rows or max(256, TILE_ELEMENTS // max(h.shape[-1], 1))
        c = chunk_tokens or max(16, LOGITS_TILE_ELEMENTS // min(rows, vocab))
        bias = getattr(head, "bias", None)
        total = _TiledFrozenCE.apply(h, y, tiles, rows, vocab, bias if isinstance(bias, torch.Tensor) else None,
                                     c, ignore_index)
        if reduction == "mean":
            total = total / (y != ignore_index).sum().clamp(min=1)
        return total
    c = chunk_tokens or default_chunk_tokens(vocab)
    if type(head) is nn.Linear:
        total = _FusedLinearCE.apply(h, head.weight, head.bias, y, c, ignore_index)
    else:
        w = getattr(head, "weight", None)  # a LoRA-wrapped head answers its base's weight
        if isinstance(w, torch.Tensor) and w.is_floating_point() and w.dtype != h.dtype \
                and not torch.is_autocast_enabled(h.device.type):
            raise ConfigError(f"chunked_cross_entropy: hidden states are {h.dtype} but the head "
                              f"{type(head).__name__}'s weight is {w.dtype}; cast them (hidden.to({w.dtype})) or "
                              "run under torch.autocast.")
        total = _checkpointed_ce(h, head, y, c, ignore_index)
    if reduction == "mean":
        total = total / (y != ignore_index).sum().clamp(min=1)
    return total


def _known_vocab(head: nn.Module) -> int | None:
    out = getattr(head, "out_features", None)
    if out is None:
        w = getattr(head, "weight", None)
        out = w.shape[0] if isinstance(w, torch.Tensor) and w.dim() == 2 else None
    return None if out is None else int(out)


def _vocab_size(head: nn.Module) -> int:
    known = _known_vocab(head)
    return 32_000 if known is None else known  # a guess for chunk sizes only


def _check_inputs(hidden, head, labels, ignore_index) -> None:
    """What the kernels below would otherwise reject with a raw torch error, or silently misread (bool
    labels read as ids 0/1, integer hidden states casting the head's weight to integers)."""
    if not isinstance(head, nn.Module):
        raise ConfigError(f"chunked_cross_entropy: head={head!r:.60} must be the output head module (e.g. "
                          "model.get_output_embeddings()), got a {type(head).__name__}.")
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dim() < 1:
        what = f"a {hidden.dtype} tensor of shape {tuple(hidden.shape)}" if isinstance(hidden, torch.Tensor) \
            else f"a {type(hidden).__name__}"
        raise ConfigError(f"chunked_cross_entropy: hidden must be a floating-point tensor (..., H) of the head's "
                          f"inputs, got {what}.")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        what = f"a {labels.dtype} tensor" if isinstance(labels, torch.Tensor) else f"a {type(labels).__name__}"
        raise ConfigError(f"chunked_cross_entropy: labels must be an integer tensor of target ids (torch.long), "
                          f"got {what}.")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ConfigError(f"chunked_cross_entropy: ignore_index={ignore_index!r}; give an integer (default -100).")
    if hidden.shape[:-1] != labels.shape:
        raise ConfigError(
            f"chunked_cross_entropy: hidden states {tuple(hidden.shape)} and labels {tuple(labels.shape)} "
            "do not line up; labels must have the hidden states' shape without the last (hidden) dimension."
        )
    w = getattr(head, "weight", None)
    fan_in = getattr(head, "in_features", None)
    if fan_in is None and isinstance(w, torch.Tensor) and w.dim() == 2:
        fan_in = w.shape[1]
    if fan_in is not None and hidden.shape[-1] != fan_in:
        raise ConfigError(f"chunked_cross_entropy: hidden states have {hidden.shape[-1]} features but the head "
                          f"{type(head).__name__} takes {fan_in}; pass the head's inputs (its last dimension "
                          f"must be {fan_in}).")


def _check_labels(y: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (y != ignore_index) & ((y < 0) | (y >= vocab))
    if bool(bad.any()):
        raise ConfigError(f"chunked_cross_entropy: label {int(y[bad][0])} is outside the head's vocabulary of "
                          f"{vocab}; labels must be in [0, {vocab}) or {ignore_index} (ignored).")


class _FusedLinearCE(torch.autograd.Function):
    """Σ CE(h Wᵀ + b, y) with ∂h, ∂W, ∂b computed chunk by chunk during the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, chunk, ignore_index):
        dt = h.dtype  # under autocast h arrives in the compute dtype; the head matmuls run in it
        w = weight.to(dt)
        b = bias.to(dt) if bias is not None else None
        need_h, need_w = h.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start:start + chunk], y[start:start + chunk]  # (C, H), (C,)
            z = F.linear(hc, w, b).float()  # (C, V)
            valid = yc != ignore_index
            safe_y = torch.where(valid, yc, 0)
            lse = torch.logsumexp(z, dim=-1)  # (C,)
            target = z.gather(1, safe_y[:, None]).squeeze(1)
            total += ((lse - target) * valid).sum()
            if need_h or need_w or need_b:
                g = z.sub_(lse[:, None]).exp_()  # softmax, in z's storage
                g[torch.arange(g.shape[0], device=g.device), safe_y] -= 1.0
                g.mul_(valid[:, None])  # ignored rows contribute nothing
                if need_h:
                    grad_h[start:start + chunk] = (g.to(dt) @ w).to(h.dtype)
                if need_w:
                    grad_w.addmm_(g.T, hc.float())
                if need_b:
                    grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dt, b_dt = ctx.dtypes
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(w_dt) if grad_w is not None else None
        gb = (grad_b * grad_out).to(b_dt) if grad_b is not None else None
        return gh, gw, gb, None, None, None


class _TiledFrozenCE(torch.autograd.Function):
    """Σ CE(h Wᵀ + b, y) for a frozen W read tile by tile (module docstring: the online softmax);
    ∂h is computed in the forward pass and only it is kept for backward."""

    @staticmethod
    def forward(ctx, h, y, tiles, rows, vocab, bias, chunk, ignore_index):
        dt = h.dtype  # the compute dtype (under autocast: what the model handed over)
        n = h.shape[0]
        need_h = h.requires_grad
        valid = y != ignore_index
        safe_y = torch.where(valid, y, 0)
        if bool(((safe_y < 0) | (safe_y >= vocab)).any()):
            bad = int(y[(safe_y < 0) | (safe_y >= vocab)][0])
            raise ConfigError(f"chunked_cross_entropy: label {bad} is outside the head's vocabulary of {vocab}; "
                              f"labels must be in [0, {vocab}) or {ignore_index} (ignored).")
        f32 = dict(dtype=torch.float32, device=h.device)
        m = torch.full((n,), float("-inf"), **f32)  # running max of each token's logits
        s = torch.zeros(n, **f32)  # Σ e^(z − m)
        target = torch.zeros(n, **f32)  # z[y]
        acc = torch.zeros(n, h.shape[1], **f32) if need_h else None  # Σ e^(z − m) W, unnormalised
        w_y = torch.zeros(n, h.shape[1], **f32) if need_h else None  # W[y]
        for v0, v1, w in tiles(dt, rows):  # w: (v1 - v0, H) in dt
            b = bias[v0:v1].to(dt) if bias is not None else None
            in_tile = (safe_y >= v0) & (safe_y < v1)
            for start in range(0, n, chunk):
                sl = slice(start, start + chunk)
                z = F.linear(h[sl], w, b).float()  # (C, V_t)
                m_new = torch.maximum(m[sl], z.amax(dim=1))
                scale = torch.exp(m[sl] - m_new)  # 0 on the first tile (m = −inf)
                idx = in_tile[sl].nonzero().squeeze(1)
                if idx.numel():  # the tokens whose target is in this tile
                    col = safe_y[sl][idx] - v0
                    target[start + idx] = z[idx, col]
                    if need_h:
                        w_y[start + idx] = w[col].float()
                p = z.sub_(m_new[:, None]).exp_()  # e^(z − m'), in z's storage
                s[sl] = s[sl] * scale + p.sum(dim=1)
                if need_h:
                    acc[sl] = acc[sl] * scale[:, None] + (p.to(dt) @ w).float()
                m[sl] = m_new
        total = ((m + s.log() - target) * valid).sum()
        grad_h = None
        if need_h:
            grad_h = acc.div_(s[:, None]).sub_(w_y).mul_(valid[:, None]).to(h.dtype)  # softmax·W − W[y]
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        return gh, None, None, None, None, None, None, None


def _chunk_loss(head: nn.Module, hc: torch.Tensor, yc: torch.Tensor, ignore_index: int) -> torch.Tensor:
    z = head(hc).float()  # (C, V)
    if _known_vocab(head) is None and not torch.compiler.is_compiling():  # only the logits tell V
        _check_labels(yc, z.shape[-1], ignore_index)
    return F.cross_entropy(z, yc, ignore_index=ignore_index, reduction="sum")


def _checkpointed_ce(h, head, y, chunk, ignore_index) -> torch.Tensor:
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        hc, yc = h[start:start + chunk], y[start:start + chunk]
        if torch.is_grad_enabled():
            # Keeps hc only; the chunk's logits are recomputed in backward (dropout RNG state restored).
            total = total + checkpoint(_chunk_loss, head, hc, yc, ignore_index, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, hc, yc, ignore_index)
    return total


#: Config fields of transformers models whose forward changes the logits after the head: the
#: head's input is then not enough to compute the loss.
_POST_HEAD_FIELDS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def unsupported_reason(model: nn.Module) -> str | None:
    """Why :func:`hidden_states_instead_of_logits` cannot serve ``model`` (None: it can)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return (f"{type(model).__name__} has no output head (get_output_embeddings() is None); "
                "use the plain loss (chunked_ce=false).")
    config = getattr(model, "config", None)
    for field in _POST_HEAD_FIELDS:
        if getattr(config, field, None) not in (None, 1, 1.0):
            return (f"{type(model).__name__} sets config.{field}={getattr(config, field)!r}, which changes "
                    "the logits after the output head; use the plain loss (chunked_ce=false).")
    return None


@contextmanager
def hidden_states_instead_of_logits(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the model's output head passes its input through, so ``model(...).logits``
    are the head's input hidden states (B, T, H); yields the head module for
    :func:`chunked_cross_entropy`. The head is restored on exit, also on an exception."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise ConfigError(f"chunked cross-entropy: {reason}")
    head = model.get_output_embeddings()
    # An instance attribute shadows the class's forward. Set through object.__setattr__: a wrapping
    # layer may route attribute assignments to the module it wraps.
    object.__setattr__(head, "forward", _passthrough)
    try:
        yield head
    finally:
        object.__delattr__(head, "forward")


def _passthrough(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return x
