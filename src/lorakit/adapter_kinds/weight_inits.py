"""Initialisations that start the adapter from the frozen weight itself: PiSSA and OLoRA.

Both split the pretrained weight W (fan_out, fan_in) into a rank-r part that the adapter takes over
and a *residual* that stays in the base layer::

    W_res = W − s·B0·A0          so that at step 0   W_res + s·B0·A0 = W   (the model is unchanged,
                                                                            up to rounding)

**What they do to the base weights:** the base layer's weight is overwritten with W_res (in its own
dtype) when the adapter is attached. The model is therefore no longer the pretrained one: keep (or
save) the residual model to use the adapter, or save the adapter as a plain LoRA against the
original weights with :func:`lorakit.adapter_kinds.weight_conversion.save_as_lora` (PEFT's
``path_initial_model_for_weight_conversion``). Other adapters on the same layers see W_res too.
Only linear-like bases (``nn.Linear``, GPT-2 ``Conv1D``) are initialised this way (as PEFT does);
a quantized base cannot take W_res in place — use LoftQ (``lorakit.quant.loftq``) there.

* **PiSSA** (Meng et al. 2024, arXiv 2404.02948, §3): W = U S Vᵀ (SVD), the r largest singular
  triplets go to the adapter, ``A0 = √(S_r/s)·V_rᵀ`` (r, fan_in), ``B0 = U_r·√(S_r/s)`` (fan_out, r),
  so s·B0A0 = U_r S_r V_rᵀ (the principal part). ``"pissa_niter_N"`` uses ``torch.svd_lowrank`` with
  N subspace iterations (fast, randomized: it draws from torch's global generator, as PEFT does).
* **OLoRA** (Büyükakyüz 2024, arXiv 2406.01775, §3): W = Q R (reduced QR), ``A0 = R[:r]`` (r, fan_in),
  ``B0 = Q[:, :r]`` (fan_out, r) — an orthonormal B at the start.
"""

from __future__ import annotations

import re

import torch

from ..errors import ConfigError, UnsupportedModuleError

_PISSA_NITER = re.compile(r"^pissa_niter_(\d+)$")


def is_weight_init(mode: object) -> bool:
    """True for the inits of this module ("pissa", "pissa_niter_N", "olora")."""
    return isinstance(mode, str) and (mode in ("pissa", "olora") or _PISSA_NITER.match(mode) is not None)


def check_mode(mode: str) -> None:
    if isinstance(mode, str) and mode.startswith("pissa") and not is_weight_init(mode):
        raise ConfigError(f"init_lora_weights={mode!r}: use 'pissa' (full SVD) or 'pissa_niter_N' with N an "
                          "integer ≥ 0 (randomized SVD with N subspace iterations), e.g. 'pissa_niter_4'.")


@torch.no_grad()
def factors_from_weight(w: torch.Tensor, r: int, scaling: float, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 (r, fan_in), B0 (fan_out, r)) in fp32 from W (fan_out, fan_in) for ``mode``; see the module doc."""
    w = w.float()
    if mode == "olora":
        q, rr = torch.linalg.qr(w)  # q (fan_out, k), rr (k, fan_in), k = min(fan_out, fan_in)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    if mode == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u_r, s_r, vh_r = u[:, :r], s[:r] / scaling, vh[:r]
    else:
        niter = int(_PISSA_NITER.match(mode).group(1))
        u_r, s_r, v_r = torch.svd_lowrank(w, r, niter=niter)
        s_r, vh_r = s_r / scaling, v_r.T
    root = s_r.sqrt()
    return (root[:, None] * vh_r).contiguous(), (u_r * root[None, :]).contiguous()


def init_from_weight(adapter, base_kind, base, path: str, mode) -> None:
    """Give ``adapter`` (a LoRA pair) PiSSA/OLoRA's factors from ``base``'s weight and remember the
    residual update −s·B0A0 for :meth:`attach` (the base is changed only once every target passed its
    checks). Refuses, naming the module, bases the residual cannot be written into."""
    if mode == "loftq":
        raise ConfigError(
            f"init_lora_weights='loftq' (module {path!r}) quantizes the base weights, which the core does not: "
            "call lorakit.quant.loftq.loftq_inject(model, config) on the full-precision model instead."
        )
    if not is_weight_init(mode):
        return
    if not base_kind.linear:
        raise UnsupportedModuleError(
            f"module {path!r} is a {type(base).__name__}: init_lora_weights={mode!r} initialises linear layers "
            "only (as PEFT); remove it from target_modules or use init_lora_weights=True for it in another adapter."
        )
    if not getattr(base_kind, "in_place", True):
        raise UnsupportedModuleError(
            f"module {path!r} is a quantized {type(base).__name__}: init_lora_weights={mode!r} must write the "
            "residual W − s·B0·A0 into the base weight, which a quantized weight cannot take. Use "
            "init_lora_weights='loftq' with lorakit.quant.loftq.loftq_inject(model, config) on the "
            "full-precision model, or run the init in full precision and quantize the residual model after."
        )
    w = base_kind.weight_2d(base).detach()  # (fan_out, fan_in)
    if adapter.r > min(w.shape):  # the SVD / QR has only min(fan_out, fan_in) directions to give
        raise ConfigError(f"init_lora_weights={mode!r} at module {path!r}: r={adapter.r} is more than the "
                          f"{min(w.shape)} directions its {tuple(w.shape)} weight has; lower r (or set rank_pattern "
                          f"for this module) to at most {min(w.shape)}.")
    if w.device.type != "meta" and not bool(torch.isfinite(w).all()):
        raise ConfigError(f"init_lora_weights={mode!r} at module {path!r}: its weight holds NaN or inf values, which "
                          "have no SVD / QR; fix the model's weights or use init_lora_weights=True.")
    a, b = factors_from_weight(w, adapter.r, adapter.scaling, mode)
    with torch.no_grad():
        adapter.lora_A.copy_(a.reshape(adapter.lora_A.shape))
        adapter.lora_B.copy_(b.reshape(adapter.lora_B.shape))
    adapter.__dict__["pending_base_delta"] = (b @ a).mul_(-adapter.scaling)  # (fan_out, fan_in) fp32
