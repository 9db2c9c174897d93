"""Targets that are not modules matched by ``target_modules``: PEFT's ``target_parameters`` (LoRA on
a module's 2-D/3-D parameters, e.g. MoE experts — ``expert_params.py``) and
``trainable_token_indices`` (chosen embedding rows — ``trainable_tokens.py``).

``plan_extra_targets`` checks everything and builds every adapter before the model is touched, and
returns the actions that attach them; ``inject`` runs them after its own targets, so a refused
injection leaves the model as it was.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import ConfigError, TargetNotFoundError, UnsupportedModuleError
from ..layers.host import LoraLayer
from ..layers.kinds import kind_of
from ..state import set_submodule
from .expert_params import ExpertLoraAdapter, ExpertParamKind, ParamHost, owner_of
from .trainable_tokens import TiedTokensAdapter, TrainableTokensAdapter


def plan_extra_targets(model: nn.Module, config, adapter_name: str,
                       module_targets: set[str]) -> list[Callable[[], None]]:
    actions = []
    if getattr(config, "target_parameters", None):
        actions += _plan_parameters(model, config, adapter_name)
    if getattr(config, "trainable_token_indices", None):
        actions += _plan_tokens(model, config, adapter_name, module_targets)
    return actions


# -- target_parameters --------------------------------------------------------------------------------
def _matches(full_name: str, targets: list[str]) -> bool:
    return any(full_name == t or full_name.endswith("." + t) for t in targets)


def _plan_parameters(model, config, adapter_name):
    targets = list(config.target_parameters)
    by_module: dict[str, list[str]] = {}
    for mpath, module in model.named_modules():
        if isinstance(module, LoraLayer):
            continue  # its parameters are reached through the owner below
        host_path = mpath
        # a module already wrapped by ParamHosts is addressed by the outermost host's path
        while host_path.endswith(".base_layer"):
            host_path = host_path[: -len(".base_layer")]
        for pname, _p in module.named_parameters(recurse=False):
            full = f"{host_path}.{pname}" if host_path else pname
            if _matches(full, targets):
                by_module.setdefault(host_path, []).append(pname)
    missing = [t for t in targets if not any(_matches(f"{m}.{p}", [t]) for m, ps in by_module.items() for p in ps)]
    if missing:
        raise TargetNotFoundError(
            f"target_parameters {missing} match no parameter of the model; name them as "
            "'<module suffix>.<parameter>', e.g. 'experts.gate_up_proj' or 'mlp.experts.down_proj'."
        )
    if config.lora_dropout:
        first = next(iter(by_module))
        raise ConfigError(
            f"lora_dropout={config.lora_dropout}: LoRA on a parameter ({first}.{by_module[first][0]}) cannot drop "
            "its input (x is not separable from W + ΔW); set lora_dropout=0 (PEFT refuses it too)."
        )
    if getattr(config, "use_dora", False):
        first = next(iter(by_module))
        raise UnsupportedModuleError(
            f"parameter {first}.{by_module[first][0]}: DoRA is not defined on target_parameters; use plain LoRA "
            "there (use_dora=False) or target modules instead."
        )
    actions = []
    for path, pnames in by_module.items():
        top = model.get_submodule(path)
        owner = owner_of(top)
        order = [n for n, _ in owner.named_parameters(recurse=False)]
        hosted = {}
        m = top
        while isinstance(m, ParamHost):
            hosted[m.kind.param_name] = m
            m = m.base_layer
        transposed = bool(getattr(owner, "is_transposed", False))
        for pname in sorted(pnames, key=order.index):
            p = getattr(owner, pname)
            if p.dim() not in (2, 3):
                raise UnsupportedModuleError(
                    f"parameter {path}.{pname} has {p.dim()} dimensions; target_parameters takes 2-D (out, in) "
                    "or 3-D expert weights (E, out, in) / (E, in, out). Remove it from target_parameters."
                )
            kind = hosted[pname].kind if pname in hosted else ExpertParamKind(pname, transposed)
            key = f"{path}.{pname}"
            adapter = ExpertLoraAdapter(kind, owner, config.rank_for(key), config.alpha_for(key),
                                        config.scaling_for(key), config.init_lora_weights)
            actions.append(_param_action(model, path, pname, kind, adapter, adapter_name))
    return actions


def _param_action(model, path, pname, kind, adapter, adapter_name):
    def attach():
        top = model.get_submodule(path)
        m = top
        while isinstance(m, ParamHost):
            if m.kind.param_name == pname:
                m.add(adapter_name, adapter)
                return
            m = m.base_layer
        host = ParamHost(top, kind)  # a new parameter: the outermost host (PEFT's nesting order)
        host.add(adapter_name, adapter)
        set_submodule(model, path, host)

    return attach


# -- trainable_token_indices ---------------------------------------------------------------------------
def _plan_tokens(model, config, adapter_name, module_targets):
    spec = config.trainable_token_indices
    if isinstance(spec, dict):
        chosen = []
        for name, idx in spec.items():
            hits = [p for p, _ in model.named_modules() if p == name or p.endswith("." + name)]
            hits = [p for p in hits if not p.endswith(".base_layer")]
            if not hits:
                raise TargetNotFoundError(f"trainable_token_indices: module {name!r} matches no module of the model.")
            chosen += [(p, idx) for p in hits]
    else:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        path = next((p for p, m in model.named_modules() if m is emb or getattr(m, "base_layer", None) is emb), None)
        if path is None:
            raise TargetNotFoundError(
                "trainable_token_indices is a list but the model has no input embedding (get_input_embeddings); "
                "give {'<embedding module name>': [indices]} instead."
            )
        chosen = [(path, spec)]
    actions = []
    for path, idx in chosen:
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        base_kind = module.kind if isinstance(module, LoraLayer) else kind_of(base)
        if base_kind is None or not base_kind.embedding:
            raise UnsupportedModuleError(
                f"module {path!r} is a {type(base).__name__}: trainable_token_indices trains rows of an "
                "nn.Embedding; name the embedding module instead."
            )
        if path in module_targets:
            raise ConfigError(
                f"module {path!r} is both a LoRA target and has trainable_token_indices; train it one way — "
                "remove it from target_modules or from trainable_token_indices."
            )
        num = base.weight.shape[0]
        bad = [i for i in idx if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num]
        if bad or not idx or len(set(idx)) != len(idx):
            raise ConfigError(
                f"trainable_token_indices for {path!r}: {list(idx)!r} — give distinct token ids in [0, {num})."
            )
        adapter = TrainableTokensAdapter(base.weight, list(idx), init=config.init_lora_weights is not False)
        actions.append(_host_action(model, path, base_kind, adapter, adapter_name))
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and getattr(head, "weight", None) is base.weight:
            head_path = next(p for p, m in model.named_modules() if m is head)
            if head_path in module_targets:
                raise ConfigError(f"the output head {head_path!r} is tied to {path!r} and is also a LoRA target; "
                                  "remove it from target_modules.")
            actions.append(_host_action(model, head_path, kind_of(head), TiedTokensAdapter(adapter), adapter_name))
    return actions


def _host_action(model, path, base_kind, adapter, adapter_name):
    def attach():
        module = model.get_submodule(path)
        host = module if isinstance(module, LoraLayer) else LoraLayer(module, base_kind)
        host.add(adapter_name, adapter)
        if host is not module:
            set_submodule(model, path, host)

    return attach
