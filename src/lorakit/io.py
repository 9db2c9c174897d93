"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors`` — ONE path
for every adapter kind (the kind says which tensors and config it writes; see
``lorakit.layers.protocol``).

Keys are those PEFT writes (adapter name stripped)::

    base_model.model.<path>.<suffix>                each adapter's ``peft_tensors`` (e.g. LoRA:
                                                    lora_A.weight (r, in), lora_B.weight (out, r);
                                                    lora_embedding_A/B on an embedding; AdaLoRA:
                                                    lora_A, lora_E, lora_B)
    base_model.model.<path>.<param>                 modules_to_save copies (e.g. classifier.weight)
    base_model.model.<path>.base_layer.bias         bias="lora_only" / "all"

The file's ``peft_type`` picks the kind (``lorakit.adapter_kinds.kind_for_file``); old spellings with
the adapter name left in (``lora_A.default.weight``, ``lora_E.default``) are accepted for every kind.

Loading checks every tensor against the model and reports all problems at once; nothing is
unpickled (safetensors, or a legacy ``.bin`` through ``torch.load(weights_only=True)``). Writes are
atomic (temporary file + rename), so an interrupted save leaves the previous adapter intact.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._fs import atomic_write_many, output_error
from ._txn import all_or_nothing
from .adapter_kinds import adapter_kind, kind_for_file
from .adapters import drop_adapter, set_trainable
from .config import LoraConfig
from .errors import AdapterFileError, AdapterStateError, ConfigError, LorakitError
from .inject import _excluded, _in_layers, candidate_modules, inject_adapter
from .peft_compat import portable_patterns, present_names, refuse_per_expert_names, suffix_copy_tensors
from .state import (
    activate,
    bias_parameters,
    lora_layers,
    model_state,
    require_adapter,
    require_module,
    trainable_copies,
    unmerge_to_switch,
)
from .validate import check_bool, check_file_ranks, check_float_tensors, read_json_object

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


# -- the key map ----------------------------------------------------------------------------------
def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter | torch.Tensor]:
    """PEFT key → the model tensor it stores, for one adapter of any kind."""
    rec = require_adapter(model, adapter_name)
    out: dict[str, torch.Tensor] = {}
    for path, host in lora_layers(model):
        if adapter_name in host.lora:
            for suffix, tensor in host.lora[adapter_name].peft_tensors(host.kind).items():
                out[f"{PREFIX}{path}.{suffix}"] = tensor
    for path, host in trainable_copies(model):
        if adapter_name in host.modules_to_save:
            for key, tensor in host.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{path}.{key}"] = tensor
    for name, p in bias_parameters(model, getattr(rec.config, "bias", "none"), adapter_name).items():
        out[f"{PREFIX}{name}"] = p
    return out


def _adapter_keys(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapters' own keys (not modules_to_save, not biases): they must be in a file."""
    return {f"{PREFIX}{path}.{suffix}": t for path, host in lora_layers(model) if adapter_name in host.lora
            for suffix, t in host.lora[adapter_name].peft_tensors(host.kind).items()}


# -- save -----------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> Path:
    """Write adapter ``adapter_name`` (any kind) to directory ``path`` in PEFT's format."""
    rec = require_adapter(model, adapter_name)
    kind = adapter_kind(rec.kind)
    path = _dir_path(path)
    tensors = dict(adapter_tensors(model, adapter_name))
    tensors.update(kind.file_extra_tensors(model, adapter_name, rec.config))
    for key, t in suffix_copy_tensors(model, rec.config).items():  # PEFT copies these too (peft_compat)
        tensors.setdefault(key, t)
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    # load_adapter refuses NaN/inf tensors, so writing them would make a file lorakit (and PEFT users) cannot use
    bad = [k for k, t in tensors.items() if t.is_floating_point() and t.numel()
           and not bool(torch.isfinite(t if t.element_size() > 1 else t.float()).all())]
    if bad:
        raise AdapterStateError(f"adapter {adapter_name!r} not saved to {path}: its tensors hold NaN or inf values: "
                                f"{', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}. Training diverged or a "
                                "weight was set by hand; save an earlier checkpoint's adapter instead.")
    config = peft_config_dict(model, adapter_name, kind.file_config(model, adapter_name, rec.config),
                              paths=kind.file_paths(model, adapter_name, rec.config))
    write_adapter_dir(path, tensors, config)
    return path


def write_adapter_dir(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way (FileExistsError, NotADirectoryError), no permission
        raise output_error(exc, path) from None
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    # both files or neither: new weights beside the old config would load with the old alpha
    atomic_write_many([(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})),
                       (path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))])


def peft_config_dict(model: nn.Module, adapter_name: str, config, paths: set[str] | None = None) -> dict:
    """``config.to_peft_dict()`` made portable: ``all-linear`` spelled out (selecting ``paths``, default
    the adapted modules), PEFT's ``fan_in_fan_out`` for transposed bases, the base model's name."""
    data = config.to_peft_dict()
    hosts = {p: h for p, h in lora_layers(model) if adapter_name in h.lora}
    if config.target_modules == "all-linear":
        data["target_modules"] = _portable_targets(model, config, set(hosts) if paths is None else paths)
    if isinstance(config, LoraConfig):  # overlapping pattern keys → exact keys PEFT reads alike
        data.update(portable_patterns(config, list(hosts)))
    if any(h.kind.transposed for h in hosts.values()):
        data["fan_in_fan_out"] = True  # what PEFT sets for GPT-2's Conv1D
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not data.get("base_model_name_or_path") and name_or_path:
        data["base_model_name_or_path"] = str(name_or_path)
    return data


def _portable_targets(model: nn.Module, config, paths: set[str]) -> list[str]:
    """Short names if they select exactly the adapted modules under PEFT's rules, else full paths."""
    short = sorted({p.rpartition(".")[2] for p in paths})
    selected = {
        p for p, _ in candidate_modules(model)
        if any(p == n or p.endswith("." + n) for n in short)
        and not _excluded(p, config.exclude_modules) and _in_layers(p, config)
    }
    return short if selected == paths else sorted(paths)


# -- load -----------------------------------------------------------------------------------------
def _dir_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"adapter directory {path!r:.60}: must be a path (str or pathlib.Path), "
                          f"got a {type(path).__name__}.")
    return Path(path)


def read_adapter_config(path: str | Path) -> dict:
    path = _dir_path(path)
    cfg = path / CONFIG_NAME
    if not path.is_dir():
        raise AdapterFileError(f"{path}: not a directory; pass the folder that holds {CONFIG_NAME}.")
    if not cfg.is_file():
        raise AdapterFileError(f"{path}: no {CONFIG_NAME}; is this an adapter saved by PEFT or lorakit?")
    return read_json_object(cfg, AdapterFileError, "the file is damaged — save the adapter again.")


def read_adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if (path / WEIGHTS_NAME).is_file():
        try:
            weights = load_file(str(path / WEIGHTS_NAME), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise AdapterFileError(f"{path / WEIGHTS_NAME}: cannot be read ({exc}); the file is damaged.") from None
        check_float_tensors(weights, str(path / WEIGHTS_NAME), AdapterFileError)
        return weights
    if (path / LEGACY_WEIGHTS_NAME).is_file():
        try:
            # weights_only: a legacy .bin is unpickled with torch's safe loader only.
            weights = torch.load(path / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterFileError(
                f"{path / LEGACY_WEIGHTS_NAME}: refused or unreadable by torch.load(weights_only=True) ({exc}). "
                "Convert it to safetensors with a tool you trust."
            ) from None
        if not isinstance(weights, dict) or not all(isinstance(k, str) for k in weights):
            raise AdapterFileError(f"{path / LEGACY_WEIGHTS_NAME}: holds a {type(weights).__name__}, not a mapping "
                                   "of tensor names to tensors; save the adapter again.")
        check_float_tensors(weights, str(path / LEGACY_WEIGHTS_NAME), AdapterFileError)
        return weights
    raise AdapterFileError(f"{path}: neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME} is there.")


def normalize_key(key: str) -> str | None:
    """Map the key spellings PEFT versions wrote onto one; None for keys that carry nothing.
    (The adapter-name segment old versions left after an adapter tensor's name is dropped against the
    expected keys, in :func:`copy_weights`, so this works for every kind's tensor names.)"""
    if not key.startswith(PREFIX):
        key = PREFIX + key
    if ".original_module." in key:
        return None  # PEFT's bias="all" also saves the frozen original of a modules_to_save module
    key = re.sub(r"\.modules_to_save\.(?:[^.]+\.)?", ".", key) if ".modules_to_save." in key else key
    return key


def _drop_name_segment(key: str, expected: dict) -> str:
    """``…lora_A.default.weight`` → ``…lora_A.weight``, ``…lora_E.default`` → ``…lora_E`` when that is
    an expected key (PEFT left the adapter name in before it stripped it on save)."""
    if key in expected:
        return key
    head, _, last = key.rpartition(".")
    if head in expected:  # <path>.<tensor>.<name>
        return head
    head2, _, _name = head.rpartition(".")
    if f"{head2}.{last}" in expected:  # <path>.<tensor>.<name>.weight
        return f"{head2}.{last}"
    return key


@all_or_nothing
def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default",
                 trainable: bool = False) -> nn.Module:
    """Load an adapter saved by PEFT or lorakit from directory ``path`` into ``model``; the file's
    ``peft_type`` picks the adapter kind (LoRA, AdaLoRA, …).

    Injects the adapter's layers as needed, copies every tensor after checking its shape, and makes the
    adapter active (frozen unless ``trainable``). On any mismatch nothing is changed and one
    ``AdapterFileError`` lists every problem.
    """
    require_module(model)
    check_bool("trainable", trainable)
    raw = read_adapter_config(path)
    source = str(Path(path) / CONFIG_NAME)
    kind = kind_for_file(raw, source)
    config = kind.config_from_file(raw, source)
    refuse_per_expert_names(model, config, source)
    weights = read_adapter_weights(path)
    # a file's names are read leniently (PEFT's SEQ_CLS heads, its bare-suffix modules_to_save match)
    config = present_names(model, config, {normalize_key(k) or k for k in weights})
    if hasattr(config, "rank_for"):  # ranks checked against the file before anything is allocated
        check_file_ranks(config.rank_for, {normalize_key(k) or k: v for k, v in weights.items()}, str(path),
                         AdapterFileError, per_expert=bool(getattr(config, "target_parameters", None)
                                                        or getattr(config, "fused_slices", None)))

    def fill() -> None:
        kind.before_load(model, adapter_name, config, source)
        copy_weights(model, adapter_name, weights, source=str(path))
        kind.after_load(model, adapter_name)

    return install_adapter(model, path, adapter_name, trainable,
                           inject_fn=lambda: inject_adapter(model, config, adapter_name, kind=kind), fill_fn=fill)


@all_or_nothing
def install_adapter(model: nn.Module, path, adapter_name: str, trainable: bool, inject_fn, fill_fn) -> nn.Module:
    """Add an adapter with ``inject_fn()`` (``inject_adapter``: no unmerge yet) and fill it with
    ``fill_fn()``, all or nothing: on any failure the adapter is removed again and the previously active
    adapters are restored. Only then, as :func:`lorakit.inject`, adapters merged before are unmerged
    (with a warning) so that the model runs the new, active adapter."""
    previous_active = list(model_state(model).active) if model_state(model) else []
    try:
        inject_fn()
    except LorakitError as exc:
        raise type(exc)(f"{path}: the adapter does not fit this model: {exc}") from None
    try:
        fill_fn()
    except BaseException:
        drop_adapter(model, adapter_name)  # no successor, no unmerge: the weights were not touched
        if previous_active:
            activate(model, previous_active)
        raise
    set_trainable(model, adapter_name, trainable)
    unmerge_to_switch(model, [adapter_name], stacklevel=5)
    return model


def copy_weights(model: nn.Module, adapter_name: str, weights: dict[str, torch.Tensor], source: str) -> None:
    expected = adapter_tensors(model, adapter_name)
    own_keys = _adapter_keys(model, adapter_name)
    required = {k for k, t in own_keys.items() if t.numel() > 0}
    base_extra = _base_layer_weights(model)
    given: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        norm = normalize_key(key)
        if norm is not None:
            given[_drop_name_segment(norm, expected)] = value
    check_and_copy(expected, given, source, optional=base_extra, required=lambda key, t: key in required,
                   skip=frozenset(own_keys))
    # The adapters' own tensors may be computed views (e.g. AdaLoRA's kept triplets): let each adapter
    # take its file tensors through the protocol.
    for path, host in lora_layers(model):
        if adapter_name in host.lora:
            own = {suffix: given[f"{PREFIX}{path}.{suffix}"]
                   for suffix in host.lora[adapter_name].peft_tensors(host.kind)
                   if f"{PREFIX}{path}.{suffix}" in given}
            host.lora[adapter_name].load_peft_tensors(host.kind, own)


def check_and_copy(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], source: str,
                   optional: dict[str, torch.Tensor] | None = None, hint: str = "same architecture and sizes",
                   required=lambda key, tensor: ".lora_" in key, skip: frozenset[str] = frozenset()) -> None:
    """Copy ``given`` into the model tensors ``expected`` (both keyed by PEFT key) after checking every
    shape; an unexpected key, a wrong shape or a missing required key is a problem, and all problems
    are reported in one ``AdapterFileError`` before anything is copied. ``optional`` keys may appear;
    ``skip`` keys are checked but left for the caller to copy."""
    optional = optional or {}
    problems, plan = [], []
    for key, value in given.items():
        target = expected.get(key, optional.get(key))
        if target is None:
            problems.append(f"unexpected tensor {key} {tuple(value.shape)}: the model has no such module")
        elif tuple(target.shape) != tuple(value.shape):
            problems.append(f"{key}: file has shape {tuple(value.shape)}, model expects {tuple(target.shape)}")
        elif key not in skip:
            plan.append((target, value))
    problems += [f"missing tensor {k} {tuple(t.shape)}" for k, t in expected.items()
                 if k not in given and required(k, t)]
    if problems:
        shown = "\n  ".join(problems[:40]) + (f"\n  … and {len(problems) - 40} more" if len(problems) > 40 else "")
        raise AdapterFileError(
            f"{source}: the adapter does not fit this model ({len(problems)} problem(s)):\n  {shown}\n"
            f"Load it into the base model it was trained on ({hint})."
        )
    with torch.no_grad():
        for target, value in plan:
            target.copy_(value.to(dtype=target.dtype, device=target.device))


def _base_layer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    # PEFT ≥ 0.7 also saves the base weights of targeted embeddings and of lm_head (save_embedding_layers),
    # with lm_head's bias where it has one (GPT-J, Phi): accept them for any host with a dense weight, and
    # copy them as PEFT does.
    out = {}
    for path, host in lora_layers(model):
        params = host.base_layer.__dict__.get("_parameters", {})
        for name in ("weight", "bias"):
            if isinstance(params.get(name), torch.Tensor):
                out[f"{PREFIX}{path}.base_layer.{name}"] = params[name]
    return out
