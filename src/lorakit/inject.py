"""Injection: find the target modules, wrap them in ``LoraLayer``, add the adapter, freeze the rest.

Matching rules (PEFT's, except that lorakit refuses names that match nothing):

* a list of names: a module matches a name if its path equals it or ends with ``"." + name``;
* a string: a regular expression that must match the whole module path;
* ``"all-linear"``: every Linear / GPT-2 Conv1D (quantized linears included) except the output
  embedding and a classification head.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from torch import nn

from ._txn import all_or_nothing
from .config import COMMON_LAYER_PATTERNS, LoraConfig
from .errors import ConfigError, TargetNotFoundError, UnsupportedModuleError
from .layers.host import LoraLayer
from .layers.kinds import kind_of, supported_type_names
from .layers.saved import TrainableCopies
from .state import AdapterRecord, lora_layers, model_state, set_submodule, trainable_copies

HEAD_NAMES = frozenset({"lm_head", "score", "classifier", "qa_outputs", "cls", "embed_out", "output"})
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
# Parameters that belong to adapters or to modules_to_save copies, not to the base model.
_INTERNAL = re.compile(r"\.(lora|original_module|modules_to_save)\.")


@all_or_nothing
def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add a LoRA adapter named ``adapter_name`` to ``model`` (in place) and return the model.

    The new adapter becomes the active and trainable one; every other parameter is frozen except
    what ``config.bias`` and ``config.modules_to_save`` ask to train. Adapters added earlier stay
    loaded (inactive); activate several with :func:`lorakit.set_adapter`.
    """
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"config must be a lorakit.LoraConfig, got {type(config).__name__}.")
    check_adapter_name(model, adapter_name)
    targets = find_targets(model, config)
    for path, module in targets:
        host = module if isinstance(module, LoraLayer) else LoraLayer(module, kind_of(module))
        host.add_adapter(
            adapter_name,
            r=config.rank_for(path),
            alpha=config.alpha_for(path),
            scaling=config.scaling_for(path),
            dropout=0.0 if host.kind.name == "embedding" else float(config.lora_dropout),
            init=config.init_lora_weights,
        )
        if host is not module:
            set_submodule(model, path, host)
    add_trainable_copies(model, config.modules_to_save or [], adapter_name)
    register_adapter(model, adapter_name, AdapterRecord(config=config, trainable=True, kind="lora"))
    return model


def register_adapter(model: nn.Module, name: str, record: AdapterRecord, activate: bool = True) -> None:
    """Record an adapter on the model, activate it (alone) and refresh which parameters train."""
    from .adapters import set_adapter  # lifecycle lives in adapters.py

    model_state(model, create=True).adapters[name] = record
    if activate:
        set_adapter(model, name)
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


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    modules = candidate_modules(model)
    targets = config.target_modules
    if targets == "all-linear":
        heads = _head_paths(model, modules)
        chosen = [(p, m) for p, m in modules if _base_kind_name(m) in _LINEAR_KINDS and p not in heads]
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
                raise TargetNotFoundError(_not_found_message(name, modules))
            chosen.extend(hits)
        chosen = list({p: (p, m) for p, m in chosen}.values())
    chosen = [(p, m) for p, m in chosen if not _excluded(p, config.exclude_modules)]
    chosen = [(p, m) for p, m in chosen if _in_layers(p, config)]
    if not chosen:
        raise TargetNotFoundError(
            f"no module is left to adapt: target_modules={targets!r} matched only modules removed by "
            f"exclude_modules={config.exclude_modules!r} / layers_to_transform={config.layers_to_transform!r}."
        )
    for path, module in chosen:
        if _base_kind_name(module) is None:
            raise UnsupportedModuleError(
                f"module {path!r} is a {type(module).__name__}, which LoRA cannot adapt. Supported: "
                f"{', '.join(supported_type_names())}. Narrow target_modules (e.g. name its Linear children)."
            )
    return chosen


_LINEAR_KINDS = {"linear", "conv1d_gpt2", "quant_linear"}


def _base_kind_name(module: nn.Module) -> str | None:
    base = module.base_layer if isinstance(module, LoraLayer) else module
    kind = kind_of(base)
    return kind.name if kind is not None else None


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


def _in_layers(path: str, config: LoraConfig) -> bool:
    if config.layers_to_transform is None:
        return True
    patterns = config.layers_pattern or COMMON_LAYER_PATTERNS
    for pat in patterns:
        m = re.search(rf"(?:^|\.){re.escape(pat)}\.(\d+)(?:\.|$)", path)
        if m:
            return int(m.group(1)) in config.layers_to_transform
    return False


def _not_found_message(name: str, modules) -> str:
    adaptable = [p for p, m in modules if _base_kind_name(m) is not None]
    suffixes = sorted({p.rpartition(".")[2] for p in adaptable})
    close = difflib.get_close_matches(name, suffixes + adaptable, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"target module {name!r} matches no module of the model.{hint} "
        f"Adaptable module names: {', '.join(suffixes[:20])}{' …' if len(suffixes) > 20 else ''}."
    )


def _sample_paths(modules, n: int = 5) -> str:
    return ", ".join(p for p, _ in modules[:n])


# -- modules_to_save ------------------------------------------------------------------------------
def add_trainable_copies(model: nn.Module, names: Iterable[str], adapter_name: str) -> None:
    modules = candidate_modules(model)
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
            host = module if isinstance(module, TrainableCopies) else TrainableCopies(module)
            host.add_copy(adapter_name)
            if host is not module:
                set_submodule(model, path, host)


# -- freezing -------------------------------------------------------------------------------------
def refresh_trainable(model: nn.Module) -> None:
    """Freeze everything, then unfreeze what the trainable adapters own."""
    st = model_state(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if st is None:
        return
    trainable = {n for n, rec in st.adapters.items() if rec.trainable}
    for _, host in lora_layers(model):
        for name, adapter in host.lora.items():
            if name in trainable:
                for p in adapter.parameters():
                    p.requires_grad_(True)
    for _, host in trainable_copies(model):
        for name, copy in host.modules_to_save.items():
            if name in trainable:
                for p in copy.parameters():
                    p.requires_grad_(True)
    for name in trainable:
        bias = getattr(st.adapters[name].config, "bias", "none")
        for p in bias_parameters(model, bias, name).values():
            p.requires_grad_(True)


def bias_parameters(model: nn.Module, bias: str, adapter_name: str) -> dict[str, nn.Parameter]:
    """The biases an adapter trains and saves: none, all, or those of its adapted layers."""
    if bias == "none":
        return {}
    if bias == "all":
        return {n: p for n, p in model.named_parameters()
                if n.endswith("bias") and not _INTERNAL.search(n)}
    out = {}
    for path, host in lora_layers(model):
        b = host.kind.bias(host.base_layer)
        if adapter_name in host.lora and isinstance(b, nn.Parameter):
            out[f"{path}.base_layer.bias"] = b
    return out
