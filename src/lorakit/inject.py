"""Injection: find the target modules, wrap them in ``LoraLayer``, add the adapter, freeze the rest —
one path for every adapter kind (``kind=``; default: the kind whose config type ``config`` is, see
``lorakit.adapter_kinds``).

Matching rules (PEFT's, except that lorakit refuses names that match nothing):

* a list of names: a module matches a name if its path equals it or ends with ``"." + name``;
* a string: a regular expression that must match the whole module path;
* ``"all-linear"``: every linear base kind (Linear / GPT-2 Conv1D / quantized linear) except the
  output embedding and a classification head;
* ``None`` (LoraConfig): PEFT's default names for ``model.config.model_type`` (``peft_defaults``).

Modules a model's fused kernels bypass (Mamba's ``out_proj`` / ``conv1d``) and dense modules whose names
PEFT rewrites into MoE expert parameters (Qwen3-MoE's dense ``down_proj``) are refused when named and
skipped by ``"all-linear"`` (``peft_defaults.peft_unreachable``).

Every check (targets, the kind's ``refuses``, geometry, ``modules_to_save`` names) runs before the
model is changed, so a refused injection leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from collections.abc import Iterable

from torch import nn

from ._txn import all_or_nothing
from .adapter_kinds import kind_for_config
from .adapter_kinds.extra_targets import plan_extra_targets
from .config import warn_pattern_overlaps
from .errors import AdapterStateError, ConfigError, TargetNotFoundError, UnsupportedModuleError
from .layers.host import LoraLayer
from .layers.kinds import BaseKind, kind_of, supported_type_names
from .layers.protocol import AdapterKind
from .layers.saved import TrainableCopies
from .peft_defaults import default_targets, moe_parameter_name, peft_unreachable
from .peft_rules import in_saved_module, layer_index
from .state import (  # noqa: F401  (refresh_trainable, bias_parameters: re-exported for callers)
    AdapterRecord,
    activate,
    bias_parameters,
    model_state,
    refresh_trainable,
    set_submodule,
    unmerge_to_switch,
)

SEQ_CLS_HEADS = ("classifier", "score")  # PEFT's names for a sequence-classification head
HEAD_NAMES = frozenset({"lm_head", "score", "classifier", "qa_outputs", "cls", "embed_out", "output"})
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@all_or_nothing
def inject(model: nn.Module, config, adapter_name: str = "default", kind: AdapterKind | None = None) -> nn.Module:
    """Add an adapter named ``adapter_name`` of ``kind`` to ``model`` (in place) and return the model.

    ``config`` is the kind's config (``LoraConfig`` for LoRA and O-LoRA, ``AdaLoraConfig`` …); without
    ``kind`` the first kind of ``lorakit.adapter_kinds.ADAPTER_KINDS`` that accepts ``config`` is used.
    The new adapter becomes the active and trainable one; every other parameter is frozen except what
    ``config.bias`` and ``config.modules_to_save`` ask to train. Adapters added earlier stay loaded
    (inactive); activate several with :func:`lorakit.set_adapter`. Activating the new adapter is
    ``set_adapter``'s switch: adapters merged before are unmerged (with a warning), as PEFT's
    ``add_adapter`` + ``set_adapter``.
    """
    inject_adapter(model, config, adapter_name, kind)
    unmerge_to_switch(model, [adapter_name], stacklevel=4)  # last: it changes weights (after every check)
    return model


def inject_adapter(model: nn.Module, config, adapter_name: str, kind: AdapterKind | None) -> None:
    """:func:`inject` without the final unmerge of merged adapters, for loaders that still fill the new
    adapter's tensors (and may fail) afterwards: they unmerge once the load has succeeded. Not all or
    nothing by itself — call it inside a wrapped call."""
    kind = kind_for_config(config) if kind is None else kind
    if not isinstance(kind, AdapterKind):
        raise ConfigError(f"kind={kind!r:.60}: must be an adapter kind of lorakit.adapter_kinds.ADAPTER_KINDS "
                          "(e.g. lorakit.adapter_kinds.LORA), or None to pick it from the config.")
    if not isinstance(config, kind.config_type):
        raise ConfigError(f"adapter kind {kind.name!r} needs a {kind.config_type.__name__}, got {type(config).__name__}.")
    check_adapter_name(model, adapter_name)
    if getattr(config, "target_modules", []) is None:  # PEFT's default for the model type; recorded resolved
        config = dataclasses.replace(config, target_modules=default_targets(model))
    config = with_seq_cls_heads(model, config)
    plan = []
    module_targets = find_targets(model, config) if config.target_modules != [] else []
    for path, module in module_targets:  # build everything before changing the model
        base = module.base_layer if isinstance(module, LoraLayer) else module
        base_kind = module.kind if isinstance(module, LoraLayer) else kind_of(module)
        reason = kind.refuses(base_kind, base)
        if reason:
            raise UnsupportedModuleError(f"module {path!r} ({type(base).__name__}) cannot take a {kind.name} "
                                         f"adapter: {reason}.")
        try:
            adapter = kind.create(base_kind, base, path, config)
        except (UnsupportedModuleError, ConfigError) as exc:  # e.g. a grouped conv's rank: say which module
            if repr(path) in str(exc):
                raise
            raise type(exc)(f"module {path!r}: {exc}") from None
        if adapter.needs_base_weight and isinstance(module, LoraLayer) and module.merged:
            raise AdapterStateError(
                f"module {path!r} has merged adapters {module.merged}: a {kind.name} adapter (DoRA, trainable tokens) "
                "is measured on the unmerged weight — unmerge first (lorakit.unmerge(model)), then add it.")
        plan.append((path, module, base_kind, adapter))
    warn_pattern_overlaps(config, [p for p, *_ in plan])
    extra = plan_extra_targets(model, config, adapter_name, {p for p, _ in module_targets})
    copies = find_copy_targets(model, config.modules_to_save or [])
    both = sorted({p for p, _ in copies} & {p for p, *_ in plan})
    if both:
        raise ConfigError(f"modules_to_save entries {both} are also adapter targets; a module is either adapted "
                          "or trained in full — remove them from one of the two lists.")
    for path, module, base_kind, adapter in plan:
        host = module if isinstance(module, LoraLayer) else LoraLayer(module, base_kind)
        host.add(adapter_name, adapter)
        adapter.attach(base_kind, host.base_layer)  # e.g. PiSSA/OLoRA leave the residual in the base
        if host is not module:
            set_submodule(model, path, host)
    for attach in extra:
        attach()
    add_trainable_copies(model, copies, adapter_name)
    register_adapter(model, adapter_name, AdapterRecord(config=config, trainable=True, kind=kind.name))


def with_seq_cls_heads(model: nn.Module, config):
    """``config`` with the model's classification head (``classifier`` / ``score``) added to
    ``modules_to_save`` when ``task_type="SEQ_CLS"``, as PEFT's PeftModelForSequenceClassification does:
    the head trains in full, nothing inside it is a LoRA target, and PEFT (which adds them on load and
    then needs their tensors) reads the file."""
    if getattr(config, "task_type", None) != "SEQ_CLS" or not hasattr(config, "modules_to_save"):
        return config
    saved = list(config.modules_to_save or [])
    heads = [n for n in SEQ_CLS_HEADS if any(  # a head not yet covered by a saved name ("model.score")
        (p == n or p.endswith("." + n)) and not isinstance(m, LoraLayer) and not in_saved_module(p, saved)
        for p, m in candidate_modules(model))]
    return dataclasses.replace(config, modules_to_save=saved + heads) if heads else config


def register_adapter(model: nn.Module, name: str, record: AdapterRecord, activate_it: bool = True) -> None:
    """Record an adapter on the model, activate it (alone) and refresh which parameters train."""
    model_state(model, create=True).adapters[name] = record
    if activate_it:
        activate(model, [name])
    else:
        refresh_trainable(model)


def check_adapter_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"adapter name {name!r}: use letters, digits, '_' or '-' (it becomes part of parameter names)."
        )
    st = model_state(model)
    if st is not None and name in st.adapters:
        raise ConfigError(
            f"the model already has an adapter named {name!r}; pick another name or remove it with "
            "lorakit.delete_adapter(model, name)."
        )


# -- matching -----------------------------------------------------------------------------------
def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module injection may look at, LoRA hosts in place of their base."""
    out, skip = [], []
    for path, module in model.named_modules():
        if not path or any(path.startswith(s) for s in skip):
            continue
        if isinstance(module, LoraLayer | TrainableCopies):
            skip.append(path + ".")
        out.append((path, module))
    return out


def find_targets(model: nn.Module, config) -> list[tuple[str, nn.Module]]:
    modules = candidate_modules(model)
    targets = config.target_modules
    if targets == "all-linear":
        heads = _head_paths(model, modules)
        chosen = [(p, m) for p, m in modules if _is_linear(m) and p not in heads]
        if not chosen:
            raise TargetNotFoundError(
                "target_modules='all-linear' found no Linear/Conv1D layer outside the output head; "
                "name the modules to adapt explicitly."
            )
    elif isinstance(targets, str):
        chosen = [(p, m) for p, m in modules if re.fullmatch(targets, p)]
        if not chosen:
            raise TargetNotFoundError(
                f"target_modules regex {targets!r} matched no module path (it must match the whole path, "
                f"e.g. '.*\\.(q_proj|v_proj)'). Some paths: {_sample_paths(modules)}."
            )
    else:
        chosen = []
        for name in targets:
            hits = [(p, m) for p, m in modules if p == name or p.endswith("." + name)]
            if not hits:
                raise TargetNotFoundError(_not_found_message(name, modules) + _parameter_hint(model, name))
            chosen.extend(hits)
        chosen = list({p: (p, m) for p, m in chosen}.values())
    chosen = [(p, m) for p, m in chosen if not _excluded(p, config.exclude_modules)]
    chosen = [(p, m) for p, m in chosen if _in_layers(p, config)]
    # As PEFT: never a target inside (or equal to) a modules_to_save module.
    chosen = [(p, m) for p, m in chosen if not in_saved_module(p, config.modules_to_save)]
    bypassed = {p: why for p, _ in chosen if (why := peft_unreachable(model, p))}
    if bypassed and targets != "all-linear":  # named on purpose: say why not (all-linear just skips them)
        raise UnsupportedModuleError(next(iter(bypassed.values())))
    if bypassed:
        warnings.warn(f"target_modules='all-linear' leaves out {len(bypassed)} module(s): "
                      f"{next(iter(bypassed.values()))}", stacklevel=3)
    chosen = [(p, m) for p, m in chosen if p not in bypassed]
    if not chosen:
        raise TargetNotFoundError(
            f"no module is left to adapt: target_modules={targets!r} matched only modules removed by "
            f"exclude_modules={config.exclude_modules!r} / layers_to_transform={config.layers_to_transform!r} "
            f"/ modules_to_save={config.modules_to_save!r} (modules trained in full are never LoRA targets)."
        )
    for path, module in chosen:
        if _base_kind(module) is None:
            raise UnsupportedModuleError(
                f"module {path!r} is a {type(module).__name__}, which LoRA cannot adapt. Supported: "
                f"{', '.join(supported_type_names())}. Narrow target_modules (e.g. name its Linear children)."
            )
    return chosen


def _base_kind(module: nn.Module) -> BaseKind | None:
    return module.kind if isinstance(module, LoraLayer) else kind_of(module)


def _is_linear(module: nn.Module) -> bool:
    kind = _base_kind(module)
    return kind is not None and kind.linear


def _head_paths(model: nn.Module, modules) -> set[str]:
    heads = {p for p, _ in modules if p.rpartition(".")[2] in HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:
        heads |= {p for p, m in modules if m is out_emb or getattr(m, "base_layer", None) is out_emb}
    return heads


def _excluded(path: str, exclude) -> bool:
    if exclude is None:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, path) is not None
    return any(path == n or path.endswith("." + n) for n in exclude)


def _in_layers(path: str, config) -> bool:
    if config.layers_to_transform is None:
        return True
    return layer_index(path, config.layers_pattern) in config.layers_to_transform  # PEFT's index rule


def _not_found_message(name: str, modules) -> str:
    adaptable = [p for p, m in modules if _base_kind(m) is not None]
    suffixes = sorted({p.rpartition(".")[2] for p in adaptable})
    close = difflib.get_close_matches(name, suffixes + adaptable, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"target module {name!r} matches no module of the model.{hint} "
        f"Adaptable module names: {', '.join(suffixes[:20])}{' …' if len(suffixes) > 20 else ''}."
    )


def _parameter_hint(model: nn.Module, name: str) -> str:
    """A hint when ``name`` is a parameter, not a module: MoE experts stored as one 3-D tensor
    (transformers 5: ``mlp.experts.down_proj`` (E, out, in)) are adapted through target_parameters."""
    param = moe_parameter_name(model, name) or name  # Qwen3-MoE 'gate_proj' → the stacked 'gate_up_proj'
    hits = [(p, tuple(t.shape)) for p, t in model.named_parameters() if p == param or p.endswith("." + param)]
    if not hits:
        return ""
    path, shape = hits[0]
    owner = path.rpartition(".")[0].rpartition(".")[2]
    what = f"{name!r} is a parameter" if param == name else f"{name!r} is part of the parameter"
    return (f" {what} ({path}, shape {shape}), not a module: adapt it with "
            f"target_parameters=[{owner + '.' + path.rpartition('.')[2]!r}] (MoE expert weights; PEFT's field).")


def _sample_paths(modules, n: int = 5) -> str:
    return ", ".join(p for p, _ in modules[:n])


# -- modules_to_save ------------------------------------------------------------------------------
def find_copy_targets(model: nn.Module, names: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """(path, module) of the ``modules_to_save`` entries, checked (nothing is changed here)."""
    modules = candidate_modules(model)
    out = []
    for name in names:
        hits = [(p, m) for p, m in modules if p == name or p.endswith("." + name)]
        if not hits:
            raise TargetNotFoundError(
                "modules_to_save: " + _not_found_message(name, modules).replace("target module", "module")
            )
        for path, module in hits:
            if isinstance(module, LoraLayer):
                raise ConfigError(
                    f"modules_to_save entry {name!r} ({path}) is also a LoRA target; a module is either "
                    "adapted or trained in full — remove it from one of the two lists."
                )
            out.append((path, module))
    return out


def add_trainable_copies(model: nn.Module, targets, adapter_name: str) -> None:
    """Give each ``modules_to_save`` target (from :func:`find_copy_targets`, or names) a trainable copy
    for ``adapter_name``."""
    targets = list(targets)
    if targets and isinstance(targets[0], str):
        targets = find_copy_targets(model, targets)
    for path, module in targets:
        if isinstance(module, LoraLayer):  # became a target of this very injection
            raise ConfigError(
                f"modules_to_save entry {path!r} is also a LoRA target; a module is either adapted or "
                "trained in full — remove it from one of the two lists."
            )
        host = module if isinstance(module, TrainableCopies) else TrainableCopies(module)
        host.add_copy(adapter_name)
        if host is not module:
            set_submodule(model, path, host)
