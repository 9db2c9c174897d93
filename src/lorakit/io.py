"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are those PEFT writes (adapter name stripped)::

    base_model.model.<path>.lora_A.weight           (r, in)        Linear, Conv1D, Conv (r, in, *k)
    base_model.model.<path>.lora_B.weight           (out, r)       (out, r, 1…) for Conv
    base_model.model.<path>.lora_embedding_A        (r, num)       Embedding
    base_model.model.<path>.lora_embedding_B        (dim, r)
    base_model.model.<path>.<param>                 modules_to_save copies (e.g. classifier.weight)
    base_model.model.<path>.base_layer.bias         bias="lora_only" / "all"

Loading checks every tensor against the model and reports all problems at once; nothing is
unpickled (safetensors, or a legacy ``.bin`` through ``torch.load(weights_only=True)``). Writes are
atomic (temporary file + rename), so an interrupted save leaves the previous adapter intact.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._fs import atomic_write, atomic_write_json
from ._txn import all_or_nothing
from .config import LoraConfig
from .errors import AdapterFileError, LorakitError
from .inject import bias_parameters, candidate_modules, inject
from .state import lora_layers, model_state, require_adapter, trainable_copies
from .validate import check_file_ranks, check_float_tensors, read_json_object

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


# -- the key map ----------------------------------------------------------------------------------
def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter | torch.Tensor]:
    """PEFT key → the model tensor it stores, for one adapter."""
    rec = require_adapter(model, adapter_name)
    out: dict[str, torch.Tensor] = {}
    for path, host in lora_layers(model):
        if adapter_name not in host.lora:
            continue
        adapter = host.lora[adapter_name]
        if host.kind.name == "embedding":
            out[f"{PREFIX}{path}.lora_embedding_A"] = adapter.lora_A
            out[f"{PREFIX}{path}.lora_embedding_B"] = adapter.lora_B
        else:
            out[f"{PREFIX}{path}.lora_A.weight"] = adapter.lora_A
            out[f"{PREFIX}{path}.lora_B.weight"] = adapter.lora_B
    for path, host in trainable_copies(model):
        if adapter_name in host.modules_to_save:
            for key, tensor in host.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{path}.{key}"] = tensor
    for name, p in bias_parameters(model, getattr(rec.config, "bias", "none"), adapter_name).items():
        out[f"{PREFIX}{name}"] = p
    return out


# -- save -----------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> Path:
    """Write adapter ``adapter_name`` to directory ``path`` in PEFT's format; returns the directory."""
    rec = require_adapter(model, adapter_name)
    if rec.kind != "lora":
        from .variants import save_variant  # AdaLoRA & co. write their own configs

        return save_variant(model, path, adapter_name)
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in adapter_tensors(model, adapter_name).items()}
    config = peft_config_dict(model, adapter_name, rec.config)
    write_adapter_dir(path, tensors, config)
    return path


def write_adapter_dir(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_json(path / CONFIG_NAME, config)


def peft_config_dict(model: nn.Module, adapter_name: str, config: LoraConfig) -> dict:
    data = config.to_peft_dict()
    hosts = {p: h for p, h in lora_layers(model) if adapter_name in h.lora}
    if config.target_modules == "all-linear":
        data["target_modules"] = _portable_targets(model, config, set(hosts))
    if any(h.kind.name == "conv1d_gpt2" for h in hosts.values()):
        data["fan_in_fan_out"] = True  # what PEFT sets for GPT-2's Conv1D
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not data.get("base_model_name_or_path") and name_or_path:
        data["base_model_name_or_path"] = str(name_or_path)
    return data


def _portable_targets(model: nn.Module, config: LoraConfig, paths: set[str]) -> list[str]:
    """Short names if they select exactly the adapted modules under PEFT's rules, else full paths."""
    from .inject import _excluded, _in_layers

    short = sorted({p.rpartition(".")[2] for p in paths})
    selected = {
        p for p, _ in candidate_modules(model)
        if any(p == n or p.endswith("." + n) for n in short)
        and not _excluded(p, config.exclude_modules) and _in_layers(p, config)
    }
    return short if selected == paths else sorted(paths)


# -- load -----------------------------------------------------------------------------------------
def read_adapter_config(path: str | Path) -> dict:
    path = Path(path)
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
    """Map the key spellings PEFT versions wrote onto one; None for keys that carry nothing."""
    if not key.startswith(PREFIX):
        key = PREFIX + key
    if ".original_module." in key:
        return None  # PEFT's bias="all" also saves the frozen original of a modules_to_save module
    key = re.sub(r"\.lora_(A|B)\.[^.]+\.weight$", r".lora_\1.weight", key)  # names left in by old versions
    key = re.sub(r"\.lora_embedding_(A|B)\.[^.]+$", r".lora_embedding_\1", key)
    key = re.sub(r"\.modules_to_save\.(?:[^.]+\.)?", ".", key) if ".modules_to_save." in key else key
    return key


@all_or_nothing
def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default",
                 trainable: bool = False) -> nn.Module:
    """Load a LoRA adapter saved by PEFT or lorakit from directory ``path`` into ``model``.

    Injects the adapter's LoRA layers as needed, copies every tensor after checking its shape, and
    makes the adapter active (frozen unless ``trainable``). On any mismatch nothing is changed and
    one ``AdapterFileError`` lists every problem.
    """
    raw = read_adapter_config(path)
    if raw.get("peft_type") == "ADALORA":
        from .variants import load_variant

        return load_variant(model, path, adapter_name, trainable, raw)
    config = LoraConfig.from_peft_dict(raw, source=str(Path(path) / CONFIG_NAME))
    weights = read_adapter_weights(path)
    check_file_ranks(config.rank_for, {normalize_key(k) or k: v for k, v in weights.items()}, str(path),
                     AdapterFileError)
    return install_adapter(model, path, adapter_name, trainable,
                           inject_fn=lambda: inject(model, config, adapter_name),
                           fill_fn=lambda: copy_weights(model, adapter_name, weights, source=str(path)))


def install_adapter(model: nn.Module, path, adapter_name: str, trainable: bool, inject_fn, fill_fn) -> nn.Module:
    """Add an adapter with ``inject_fn()`` and fill it with ``fill_fn()``, all or nothing: on any
    failure the adapter is removed again and the previously active adapters are restored."""
    from .adapters import delete_adapter, set_adapter, set_trainable

    previous_active = list(model_state(model).active) if model_state(model) else []
    try:
        inject_fn()
    except LorakitError as exc:
        raise type(exc)(f"{path}: the adapter does not fit this model: {exc}") from None
    try:
        fill_fn()
    except BaseException:
        delete_adapter(model, adapter_name)
        if previous_active:
            set_adapter(model, previous_active)
        raise
    set_trainable(model, adapter_name, trainable)
    return model


def copy_weights(model: nn.Module, adapter_name: str, weights: dict[str, torch.Tensor], source: str) -> None:
    expected = adapter_tensors(model, adapter_name)
    base_extra = _base_layer_weights(model)
    given: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        norm = normalize_key(key)
        if norm is not None:
            given[norm] = value
    check_and_copy(expected, given, source, optional=base_extra)


def check_and_copy(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], source: str,
                   optional: dict[str, torch.Tensor] | None = None, hint: str = "same architecture and sizes",
                   required=lambda key, tensor: ".lora_" in key) -> None:
    """Copy ``given`` into the model tensors ``expected`` (both keyed by PEFT key) after checking every
    shape; an unexpected key, a wrong shape or a missing required key is a problem, and all problems
    are reported in one ``AdapterFileError`` before anything is copied. ``optional`` keys may appear."""
    optional = optional or {}
    problems, plan = [], []
    for key, value in given.items():
        target = expected.get(key, optional.get(key))
        if target is None:
            problems.append(f"unexpected tensor {key} {tuple(value.shape)}: the model has no such module")
        elif tuple(target.shape) != tuple(value.shape):
            problems.append(f"{key}: file has shape {tuple(value.shape)}, model expects {tuple(target.shape)}")
        else:
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
    # PEFT ≥ 0.7 also saves the base weights of targeted embeddings (save_embedding_layers): accept them.
    out = {}
    for path, host in lora_layers(model):
        if host.kind.name == "embedding":
            out[f"{PREFIX}{path}.base_layer.weight"] = host.base_layer.weight
    return out
