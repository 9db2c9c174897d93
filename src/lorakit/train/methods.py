"""Fine-tuning methods by name: ``--method lora|loraplus|full|adalora|olora``.

A method is a function ``build(model, args) -> MethodSetup``: it prepares the model (injects
adapters, unfreezes what trains) and says which hooks, optimizer parameter groups and artifact
writer the loop uses. Adding one is a single call::

    from lorakit.train import methods

    @methods.register("mymethod")
    def build(model, args):
        lorakit.inject(model, methods.lora_config(args))
        return methods.MethodSetup(model, hooks=[MyHook(args.method_options)])

Methods that live in other modules are found lazily: ``PROVIDERS`` maps a name to the module that
registers it on import (``lorakit.variants.adalora`` registers ``"adalora"``), so their code is
imported only when asked for. A name missing from both is "not available" (a ``ConfigError``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..config import LoraConfig
from ..errors import ConfigError
from .args import TrainArgs
from .hooks import TrainHook


def _save_adapter(model: nn.Module, path: Path, tokenizer: Any) -> None:
    from ..io import save_adapter

    save_adapter(model, path)


@dataclass
class MethodSetup:
    """What a method hands to the loop.

    Attributes:
        model: the prepared model (usually the same object, changed in place).
        hooks: training hooks (see ``lorakit.train.hooks``), called in this order.
        param_groups: optimizer parameter groups; ``None`` = every trainable parameter at ``args.lr``.
            A group may carry its own ``lr`` (it is scaled by the schedule like the others).
        save: writes the final artifact: ``save(model, directory, tokenizer)``; default
            ``lorakit.save_adapter`` (PEFT format).
        artifact: the name of the artifact's sub-directory of ``output_dir``.
    """

    model: nn.Module
    hooks: list[TrainHook] = field(default_factory=list)
    param_groups: list[dict[str, Any]] | None = None
    save: Callable[[nn.Module, Path, Any], None] = _save_adapter
    artifact: str = "adapter"


MethodBuilder = Callable[[nn.Module, TrainArgs], MethodSetup]
_REGISTRY: dict[str, MethodBuilder] = {}
PROVIDERS: dict[str, str] = {
    "adalora": "lorakit.variants.adalora",
    "olora": "lorakit.variants.olora",
    "expand": "lorakit.variants.expand",
}


def register(name: str, builder: MethodBuilder | None = None):
    """Register ``builder`` under ``name`` (also usable as a decorator). Re-registering replaces it."""
    def deco(fn: MethodBuilder) -> MethodBuilder:
        _REGISTRY[name] = fn
        return fn

    return deco(builder) if builder is not None else deco


def get(name: str) -> MethodBuilder:
    if name not in _REGISTRY and name in PROVIDERS:
        try:
            importlib.import_module(PROVIDERS[name])
        except ImportError as exc:
            raise ConfigError(
                f"method {name!r} is not available: its module {PROVIDERS[name]} cannot be imported ({exc}). "
                f"Available methods: {', '.join(available())}."
            ) from None
    if name not in _REGISTRY:
        raise ConfigError(f"method {name!r} is not available. Available methods: {', '.join(available())}.")
    return _REGISTRY[name]


def available() -> list[str]:
    """Registered methods and those a provider module would register on first use."""
    return sorted(set(_REGISTRY) | set(PROVIDERS))


def lora_config(args: TrainArgs, **overrides: Any) -> LoraConfig:
    """The ``LoraConfig`` the LoRA settings of ``args`` describe (variants may reuse it)."""
    kwargs = dict(
        r=args.r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.target_modules,
        exclude_modules=args.exclude_modules,
        modules_to_save=args.modules_to_save,
        use_rslora=args.use_rslora,
        task_type="SEQ_CLS" if args.task == "seq-cls" else "CAUSAL_LM",
    )
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


# -- the methods this module provides ------------------------------------------------------------
@register("lora")
def _lora(model: nn.Module, args: TrainArgs) -> MethodSetup:
    from ..inject import inject

    _no_options(args)
    inject(model, lora_config(args))
    return MethodSetup(model)


@register("loraplus")
def _loraplus(model: nn.Module, args: TrainArgs) -> MethodSetup:
    from ..inject import inject
    from ..variants.loraplus import loraplus_param_groups

    _no_options(args)
    inject(model, lora_config(args))
    groups = loraplus_param_groups(model, args.lr, ratio=args.loraplus_ratio,
                                   embedding_lr=args.loraplus_embedding_lr, weight_decay=args.weight_decay)
    return MethodSetup(model, param_groups=groups)


@register("full")
def _full(model: nn.Module, args: TrainArgs) -> MethodSetup:
    _no_options(args)
    for p in model.parameters():
        p.requires_grad_(True)

    def save(m: nn.Module, path: Path, tokenizer: Any) -> None:
        m.save_pretrained(path, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    return MethodSetup(model, save=save, artifact="model")


def _no_options(args: TrainArgs) -> None:
    if args.method_options:
        raise ConfigError(f"method {args.method!r} takes no method_options, got {sorted(args.method_options)}; "
                          "remove them (they are for variants such as adalora).")
