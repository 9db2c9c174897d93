"""Reading and writing configs so that PEFT and lorakit agree on what a file means.

* :func:`present_names` — a PEFT file is read leniently: names in ``target_modules`` /
  ``modules_to_save`` that match no module are dropped (PEFT's SEQ_CLS task adds both
  ``"classifier"`` and ``"score"`` whatever the model has). A user's own config stays strict at
  :func:`lorakit.inject`. The config that is kept records the names that matched. PEFT picks
  ``modules_to_save`` by a bare string suffix (``_set_trainable``: ``key.endswith(name)``), so
  ``"classifier"`` also copies DistilBERT's ``pre_classifier`` and the file holds its trained weights:
  such modules are added by full path when the file has tensors for them, and
  :func:`suffix_copy_tensors` writes their (unchanged) weights into lorakit's files, since PEFT's
  loader requires a tensor for every module it copied.
  Names in ``target_parameters`` that match no parameter are dropped too (PEFT keeps such files).
* :func:`portable_patterns` — when rank/alpha pattern keys overlap on adapted modules, the file gets
  one exact key per module instead, so PEFT (first key in the file's sorted order wins) and lorakit
  (most specific key wins) read the same values.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from .config import LoraConfig, pattern_key, pattern_overlaps
from .errors import AdapterFileError
from .inject import candidate_modules
from .layers.host import LoraLayer
from .layers.saved import TrainableCopies
from .peft_defaults import moe_parameter_name


def _matches(name: str, paths: list[str]) -> bool:
    return any(p == name or p.endswith("." + name) for p in paths)


def present_names(model: nn.Module, config: LoraConfig, file_keys=()) -> LoraConfig:
    """``config`` with the list names that match no module of ``model`` removed, and the modules PEFT
    saved under a bare-suffix ``modules_to_save`` match added (``file_keys``: the file's normalized
    tensor keys, ``base_model.model.<path>.<param>``); see the module doc.

    Target lists that would become empty are left as they are, so injection reports the problem (an
    empty ``target_parameters`` beside module targets is dropped: PEFT saves such files)."""
    paths = [p for p, _ in candidate_modules(model)]
    changes = {}
    if isinstance(config.target_modules, list):
        kept = [n for n in config.target_modules if _matches(n, paths)]
        if kept and kept != config.target_modules:
            changes["target_modules"] = kept
    params = getattr(config, "target_parameters", None)
    if params:
        # PEFT (transformers 5) moves MoE names of target_modules into target_parameters for the whole
        # model type, and keeps a file whose target_parameters match nothing (BEAM's dense-only layers).
        names = _parameter_names(model)
        kept = [n for n in params if _matches(n, names)]
        if kept != params and (kept or config.target_modules):
            changes["target_parameters"] = kept or None
    if config.modules_to_save:
        kept = [n for n in config.modules_to_save if _matches(n, paths)]
        kept += _suffix_only_copies(config.modules_to_save, paths, file_keys)
        if kept != config.modules_to_save:
            changes["modules_to_save"] = kept or None
    return dataclasses.replace(config, **changes) if changes else config


def _parameter_names(model: nn.Module) -> list[str]:
    """``<module path>.<parameter>`` of every parameter, wrappers' ``.base_layer`` steps removed (PEFT's
    ``_inject_parameters`` matches these names)."""
    return [re.sub(r"(^|\.)(base_layer\.)+", r"\1", n) for n, _ in model.named_parameters()]


def refuse_per_expert_names(model: nn.Module, config, source: str) -> None:
    """A file whose ``target_modules`` name per-expert Linear layers (Mixtral's ``w1``, Qwen-MoE's
    ``gate_proj``) that this model stacks into 3-D expert parameters was saved for transformers 4; PEFT
    converts such files on load (fusing the experts' factors), lorakit does not: say so, by name."""
    names = config.target_modules if isinstance(config.target_modules, list) else []
    paths = [p for p, _ in candidate_modules(model)]
    stale = [n for n in names if moe_parameter_name(model, n) and not _matches(n, paths)]
    if stale:
        raise AdapterFileError(
            f"{source}: target_modules {stale} are per-expert Linear layers of transformers 4; this model stores "
            f"its experts stacked ({', '.join(sorted({moe_parameter_name(model, n) for n in stale}))} in "
            "target_parameters). lorakit does not convert such adapters: load it once with PEFT (which fuses the "
            "experts' factors) and save it again, or train a new adapter with target_parameters.")


def _suffix_only(names, path: str) -> bool:
    """``path`` ends with one of ``names`` as a bare string but not after a ``.``."""
    return any(path.endswith(n) and not (path == n or path.endswith("." + n)) for n in names)


def _suffix_only_copies(names: list[str], paths: list[str], file_keys) -> list[str]:
    """Full paths of modules PEFT's bare-suffix rule copied for ``names`` (``pre_classifier`` for
    ``classifier``) that the dot-bounded rule misses, when the file holds their own tensors (not LoRA
    factors)."""
    out = []
    for p in paths:
        keys = [k for k in file_keys if k.startswith(f"base_model.model.{p}.")]
        if _suffix_only(names, p) and keys and not any(".lora_" in k or ".base_layer." in k for k in keys):
            out.append(p)
    return sorted(out)


def suffix_copy_tensors(model: nn.Module, config) -> dict[str, torch.Tensor]:
    """PEFT key → tensor of every module PEFT's bare-suffix ``modules_to_save`` rule would copy beyond
    lorakit's copies (``pre_classifier`` for ``classifier``): their current weights, so PEFT finds them."""
    names = getattr(config, "modules_to_save", None) or []
    modules = candidate_modules(model)
    wrapped = [q + "." for q, m in modules if isinstance(m, LoraLayer | TrainableCopies)]
    out = {}
    for path, module in modules:
        if _suffix_only(names, path) and not any((path + ".").startswith(w) for w in wrapped):
            out.update({f"base_model.model.{path}.{k}": t for k, t in module.state_dict().items()})
    return out


def portable_patterns(config: LoraConfig, paths: list[str]) -> dict[str, dict]:
    """``{"rank_pattern": ..., "alpha_pattern": ...}`` to write for the adapted module ``paths``:
    unchanged when no key overlaps another on an adapted module, else one anchored exact-path key
    (``^model\\.layers\\.1\\.q_proj$``) per module whose value differs from the default."""
    out = {}
    for field_name, default in (("rank_pattern", config.r), ("alpha_pattern", config.lora_alpha)):
        patterns = getattr(config, field_name)
        if not pattern_overlaps(patterns, paths):
            out[field_name] = dict(patterns)
            continue
        explicit = {}
        for path in sorted(paths):
            key = pattern_key(patterns, path)
            if key is not None and patterns[key] != default:
                explicit[f"^{re.escape(path)}$"] = patterns[key]
        out[field_name] = explicit
    return out
