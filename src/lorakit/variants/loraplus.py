"""LoRA+ (Hayou, Ghosh & Yu 2024, arXiv 2402.12354): train B with a larger learning rate than A.

§3 of the paper shows that with one learning rate for both factors, feature learning is inefficient
at large width; giving B the rate ``η_B = λ · η_A`` with λ ≫ 1 (they recommend λ = 2⁴ = 16) fixes
that. LoRA+ is therefore nothing but optimizer parameter groups — no layer or loss changes:

    group        parameters                                       lr               weight decay
    "lora_A"     A factors of non-embedding adapters              lr               weight_decay
    "lora_B"     B factors of non-embedding adapters              lr · ratio       weight_decay
    "lora_B_1d"  other trainable 1-D tensors (biases, norms)      lr · ratio       0
    "embedding"  both factors of embedding adapters               embedding_lr     weight_decay
    "other"      other trainable tensors (modules_to_save, ...)   lr               weight_decay

These are the groups PEFT's ``create_loraplus_optimizer`` builds (same rates, same defaults:
``embedding_lr = 1e-6``), so the two libraries train alike. Empty groups are left out.

Usage outside the CLI::

    opt = create_loraplus_optimizer(model, lr=2e-4, ratio=16)
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..state import lora_layers

DEFAULT_EMBEDDING_LR = 1e-6  # PEFT's loraplus_lr_embedding default


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, embedding_lr: float | None = None,
                          weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+ over the trainable parameters of ``model``.

    Each group carries a ``"name"`` key (``"lora_A"``, ``"lora_B"``, ...) for logging; PyTorch
    optimizers keep extra group keys as they are.
    """
    checks = [("lr", lr, 0.0), ("ratio", ratio, 0.0)] + ([("embedding_lr", embedding_lr, 0.0)]
                                                          if embedding_lr is not None else [])
    for name, value, low in checks:  # inf passed `> 0` and made every step's update inf
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < math.inf:
            raise ConfigError(f"loraplus {name}={value!r}: must be a positive finite number (ratio 16 is the "
                              "paper's choice).")
    wd = weight_decay
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not 0 <= wd < math.inf:
        raise ConfigError(f"loraplus weight_decay={wd!r}: must be a finite number ≥ 0 (e.g. 0.0 or 0.01).")
    if embedding_lr is None:
        embedding_lr = DEFAULT_EMBEDDING_LR
    role: dict[int, str] = {}
    for _, host in lora_layers(model):
        embedding = host.kind.embedding
        for adapter in host.lora.values():
            # Variants (AdaLoRA's P·Λ·Q, O-LoRA) may hold other tensors; only lora_A / lora_B get roles.
            for attr, kind in (("lora_A", "lora_A"), ("lora_B", "lora_B")):
                p = getattr(adapter, attr, None)
                if isinstance(p, nn.Parameter):
                    role[id(p)] = "embedding" if embedding else kind
    groups: dict[str, list[nn.Parameter]] = {k: [] for k in ("lora_A", "lora_B", "lora_B_1d", "embedding", "other")}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        kind = role.get(id(p))
        if kind is None:
            kind = "lora_B_1d" if p.ndim == 1 else "other"
        groups[kind].append(p)
    if not any(groups.values()):
        raise ConfigError("the model has no trainable parameters; inject an adapter (lorakit.inject) before "
                          "building LoRA+ parameter groups.")
    settings = {
        "lora_A": (lr, weight_decay),
        "lora_B": (lr * ratio, weight_decay),
        "lora_B_1d": (lr * ratio, 0.0),
        "embedding": (embedding_lr, weight_decay),
        "other": (lr, weight_decay),
    }
    return [
        {"params": params, "lr": settings[name][0], "weight_decay": settings[name][1], "name": name}
        for name, params in groups.items()
        if params
    ]


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                              *, lr: float, ratio: float = 16.0, embedding_lr: float | None = None,
                              weight_decay: float = 0.0, **optimizer_kwargs: Any) -> torch.optim.Optimizer:
    """An optimizer (AdamW by default) over :func:`loraplus_param_groups`; extra kwargs go to it."""
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise ConfigError(f"optimizer_cls={optimizer_cls!r:.60}: give a torch.optim.Optimizer class, e.g. "
                          "torch.optim.AdamW.")
    params = inspect.signature(optimizer_cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(optimizer_kwargs) - set(params))
        if unknown:  # the optimizer's own TypeError would not say which call
            raise ConfigError(f"{optimizer_cls.__name__} takes no option(s) {unknown}; its options: "
                              f"{', '.join(k for k in params if k not in ('self', 'params'))}.")
    groups = loraplus_param_groups(model, lr, ratio=ratio, embedding_lr=embedding_lr, weight_decay=weight_decay)
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)
