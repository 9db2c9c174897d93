"""Fine-tuning methods by name: ``--method lora|loraplus|full|adalora|olora|expand|loha|lokr``.

A method is a function ``build(model, args) -> MethodSetup``: it prepares the model (injects
adapters, unfreezes what trains) and says which hooks, optimizer parameter groups and artifact
writer the loop uses. The methods are a static table, :data:`METHODS` — nothing registers itself
at import time, and the variants they use (below ``train/`` in the dependency order) never import
this package. Adding a method = writing its ``build`` here (a few lines: the variant does the work)
and adding one entry to the table.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..adapter_kinds.lycoris_config import LoHaConfig, LoKrConfig
from ..adapter_kinds.weight_inits import is_weight_init
from ..adapters import merge_and_unload
from ..config import LoraConfig
from ..errors import ConfigError
from ..hooks import TrainHook
from ..init_conversion import initial_factors, save_as_lora
from ..inject import inject
from ..io import save_adapter
from ..validate import check_bool
from ..variants import expand, olora
from ..variants.adalora import AUTO_WARMUPS, AdaLoraHook, adalora_config, inject_adalora
from ..variants.loraplus import loraplus_param_groups

#: The run's settings, a ``lorakit.train.TrainArgs``. Not imported: ``args.py`` reads :data:`METHODS` to
#: refuse an unknown ``method`` on construction, so this table is the one list of method names.
RunArgs = Any


def _save_adapter(model: nn.Module, path: Path, tokenizer: Any) -> None:
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
        fingerprint: settings of the built adapter a checkpoint must agree with to resume (beside the
            run's own, ``setup.fingerprint``), e.g. a digest of PiSSA's recomputed starting factors.
    """

    model: nn.Module
    hooks: list[TrainHook] = field(default_factory=list)
    param_groups: list[dict[str, Any]] | None = None
    save: Callable[[nn.Module, Path, Any], None] = _save_adapter
    artifact: str = "adapter"
    fingerprint: dict[str, Any] = field(default_factory=dict)


MethodBuilder = Callable[[nn.Module, RunArgs], MethodSetup]


def get(name: str) -> MethodBuilder:
    if name not in METHODS:
        raise ConfigError(f"method {name!r} is not available. Available methods: {', '.join(available())}.")
    return METHODS[name]


def available() -> list[str]:
    return sorted(METHODS)


def lora_config(args: RunArgs, **overrides: Any) -> LoraConfig:
    """The ``LoraConfig`` the LoRA settings of ``args`` describe (variants may reuse it)."""
    kwargs = dict(
        r=args.r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.target_modules,
        exclude_modules=args.exclude_modules,
        modules_to_save=args.modules_to_save,
        use_rslora=args.use_rslora,
        use_dora=args.use_dora,
        fused_slices=args.fused_slices,
        task_type="SEQ_CLS" if args.task == "seq-cls" else "CAUSAL_LM",
    )
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def _inject_lora(model: nn.Module, args: RunArgs) -> MethodSetup:
    """Method lora's adapter, with the run's start (``init_lora_weights``) and shape options.

    PiSSA / OLoRA (Meng et al. 2024 §3; Büyükakyüz 2024) start from factors of W's SVD / QR and leave
    the residual W − s·B0·A0 in the base, so the trained factors only fit the residual model. The
    artifact is therefore written as PEFT's ``path_initial_model_for_weight_conversion`` (and
    LLaMA-Factory's ``pissa_convert``) write it: a rank-2r LoRA of the original weights,
    [B | −B0]·[A ; A0] (``init_conversion.save_as_lora``), which ``lorakit eval/merge/generate`` and
    PEFT apply to the untouched base. Checkpoints keep the raw factors: a resume runs the init again on
    the original weights, and a digest of the starting factors (in the fingerprint) refuses a resume
    whose SVD / QR came out differently (another thread count or CPU).
    """
    config = lora_config(args, **args.lora_shape_options())
    inject(model, config)
    setup = MethodSetup(model)
    if is_weight_init(config.init_lora_weights):
        start = initial_factors(model)
        digest = hashlib.sha256()
        for key in sorted(start):
            digest.update(key.encode())
            digest.update(start[key].numpy().tobytes())
        setup.fingerprint = {"initial_factors_sha256": digest.hexdigest()}
        setup.save = lambda m, path, tokenizer: save_as_lora(m, path, start)
    return setup


# -- the methods ------------------------------------------------------------------------------------
def _lora(model: nn.Module, args: RunArgs) -> MethodSetup:
    _no_options(args)
    return _inject_lora(model, args)


def _loraplus(model: nn.Module, args: RunArgs) -> MethodSetup:
    _no_options(args)
    setup = _inject_lora(model, args)
    setup.param_groups = loraplus_param_groups(model, args.lr, ratio=args.loraplus_ratio,
                                               embedding_lr=args.loraplus_embedding_lr,
                                               weight_decay=args.weight_decay)
    return setup


#: LoKr's ``method_options`` (PEFT's LoKrConfig fields of the same names).
LOKR_OPTIONS = ("decompose_both", "decompose_factor")


def _lycoris_config(args: RunArgs) -> LoHaConfig | LoKrConfig:
    """LoHa / LoKr (Hyeon-Woo et al. 2022 §3.2; Yeh et al. 2024, LyCORIS §3): the run's r, lora_alpha,
    targets and shape options; LoKr also takes ``method_options`` decompose_both / decompose_factor."""
    common = dict(r=args.r, alpha=args.lora_alpha, target_modules=args.target_modules,
                  exclude_modules=args.exclude_modules, modules_to_save=args.modules_to_save,
                  layers_to_transform=args.layers_to_transform, layers_pattern=args.layers_pattern,
                  rank_pattern=args.rank_pattern, alpha_pattern=args.alpha_pattern)
    if args.method == "loha":
        _no_options(args)
        return LoHaConfig(**common)
    opts = dict(args.method_options or {})
    unknown = sorted(set(opts) - set(LOKR_OPTIONS))
    if unknown:
        raise ConfigError(f"method lokr: unknown method_options {unknown}; valid: {', '.join(LOKR_OPTIONS)}.")
    return LoKrConfig(**common, **opts)


def _lycoris(model: nn.Module, args: RunArgs) -> MethodSetup:
    inject(model, _lycoris_config(args))
    return MethodSetup(model)


def _full(model: nn.Module, args: RunArgs) -> MethodSetup:
    _no_options(args)
    for p in model.parameters():
        p.requires_grad_(True)

    def save(m: nn.Module, path: Path, tokenizer: Any) -> None:
        m.save_pretrained(path, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    return MethodSetup(model, save=save, artifact="model")


def _adalora(model: nn.Module, args: RunArgs) -> MethodSetup:
    """AdaLoRA (``lorakit.variants.adalora.method`` maps the run's flags onto ``AdaLoraConfig``)."""
    config, auto = adalora_config(args)
    inject_adalora(model, config)
    return MethodSetup(model, hooks=[AdaLoraHook(model=model, auto_warmups=AUTO_WARMUPS if auto else None)])


def _olora_options(args: RunArgs) -> tuple[Any, olora.OLoraHook]:
    """(past, the loss hook) from ``method_options``; a ConfigError names a bad one."""
    opts = dict(args.method_options or {})
    unknown = sorted(set(opts) - set(olora.OPTIONS))
    if unknown:
        raise ConfigError(f"method olora: unknown method_options {unknown}; valid: {', '.join(olora.OPTIONS)}.")
    if args.use_dora or args.fused_slices:
        raise ConfigError("method olora trains plain LoRA factors; use_dora / fused_slices do not apply. Drop them.")
    past = opts.pop("past", None)
    if past is not None and not isinstance(past, str):
        raise ConfigError(f"method olora: method_options.past={past!r}: give the directory of the earlier tasks' "
                          "adapter.")
    return past, olora.OLoraHook(**opts, adapter_name=olora.KIND)


def _olora(model: nn.Module, args: RunArgs) -> MethodSetup:
    """O-LoRA. ``method_options``: lambda_orth (λ1, 0.5), lambda_l2 (λ2, 0), overlap (abs|square),
    l2 (square|norm), past (a LoRA adapter directory holding the earlier tasks' factors). Saves past +
    current factors (and modules_to_save) as one plain PEFT LoRA adapter."""
    past, hook = _olora_options(args)
    olora.add_olora(model, lora_config(args), olora.KIND)
    if past:
        olora.load_past(model, past, olora.KIND)

    def save(m: nn.Module, directory: Path, tokenizer: Any) -> None:
        save_adapter(m, directory, olora.KIND)

    return MethodSetup(model, hooks=[hook], save=save)


def _expand(model: nn.Module, args: RunArgs) -> MethodSetup:
    """LLaMA-Pro. ``method_options``: n_new (blocks to add, default 1); blocks (instead of n_new: train
    these existing block indices, e.g. the new blocks of a model expanded earlier); lora (false: train
    the blocks fully; true: LoRA with the run's r/alpha on them only). Saves the whole model (with
    lora, the adapter merged into a copy) as a transformers checkpoint."""
    blocks, n_new, use_lora = _expand_options(args)
    if blocks is not None:
        new = blocks
        expand.train_blocks(model, new)
    else:
        new = expand.expand_blocks(model, n_new, freeze=True)
    if use_lora:
        inject(model, lora_config(args, layers_to_transform=new))

    def save(m: nn.Module, path: Path, tokenizer: Any) -> None:
        # merge into a copy: the loop may save mid-run and must keep training the adapter
        plain = merge_and_unload(copy.deepcopy(m)) if use_lora else m
        plain.save_pretrained(path, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    return MethodSetup(model, save=save, artifact="model")


def _expand_options(args: RunArgs) -> tuple[list[int] | None, int, bool]:
    """(blocks or None, n_new, lora) from ``method_options``; a ConfigError names a bad one (``int('x')``
    and ``bool('false')`` used to raise or read wrongly)."""
    opts = dict(args.method_options or {})
    unknown = sorted(set(opts) - {"n_new", "blocks", "lora"})
    if unknown:
        raise ConfigError(f"method expand: unknown method_options {unknown}; valid: n_new, blocks, lora.")
    use_lora = check_bool("method expand: method_options.lora", opts.get("lora", False))
    if "blocks" in opts:
        if "n_new" in opts:
            raise ConfigError("method expand: give n_new (expand now) or blocks (train existing blocks), not both.")
        blocks = opts["blocks"]
        if not isinstance(blocks, list) or not blocks or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in blocks):
            raise ConfigError(f"method expand: method_options.blocks={blocks!r}: give a list of block indices, "
                              "e.g. [2, 5].")
        return blocks, 0, use_lora
    n_new = opts.get("n_new", 1)
    if isinstance(n_new, bool) or not isinstance(n_new, int) or n_new < 1:
        raise ConfigError(f"method expand: method_options.n_new={n_new!r}: the number of blocks to add must be an "
                          "integer ≥ 1 that divides the model's block count.")
    return None, n_new, use_lora


def check_options(args: RunArgs) -> None:
    """Refuse bad ``method_options`` for ``args.method`` before a run loads a model or writes anything
    (the builders run the same checks again on the model)."""
    METHODS[args.method].check_options(args)


def _no_options(args: RunArgs) -> None:
    if args.method_options:
        raise ConfigError(f"method {args.method!r} takes no method_options, got {sorted(args.method_options)}; "
                          "remove them (they are for variants such as adalora).")


@dataclass(frozen=True)
class Method:
    """One entry of :data:`METHODS`: ``build(model, args)`` prepares the model (calling the entry does the
    same), ``check_options(args)`` is the model-free part — the ``method_options`` checks run before a
    run makes its output directory."""

    build: MethodBuilder
    check_options: Callable[[RunArgs], Any]

    def __call__(self, model: nn.Module, args: RunArgs) -> MethodSetup:
        return self.build(model, args)


#: Every method, by its ``--method`` name: the one list of names (``TrainArgs`` checks ``method`` against it).
METHODS: dict[str, Method] = {
    "lora": Method(_lora, _no_options),
    "loraplus": Method(_loraplus, _no_options),
    "full": Method(_full, _no_options),
    "adalora": Method(_adalora, adalora_config),
    "olora": Method(_olora, _olora_options),
    "expand": Method(_expand, _expand_options),
    "loha": Method(_lycoris, _lycoris_config),
    "lokr": Method(_lycoris, _lycoris_config),
}

#: Each method's ``method_options`` check (a view of :data:`METHODS`, for callers that want only that part).
OPTION_CHECKS: dict[str, Callable[[RunArgs], Any]] = {name: m.check_options for name, m in METHODS.items()}
