"""AdaLoRA adapter files in PEFT's format (``peft_type: "ADALORA"``), both ways.

Keys (adapter name stripped, as PEFT writes them)::

    base_model.model.<path>.lora_A      Q (k, fan_in)      k = kept rank of that matrix
    base_model.model.<path>.lora_E      λ (k, 1)
    base_model.model.<path>.lora_B      P (fan_out, k)

``adapter_config.json`` carries ``init_r`` and, once ranks were allocated, PEFT's ``rank_pattern``
``{"<path>.lora_E": [kept?] * init_r}``; the tensors hold only the kept triplets (PEFT's
``resize_state_dict_by_rank_pattern``). A matrix allocated rank 0 is still listed, with all-False
flags and (0, fan_in) / (0, 1) / (fan_out, 0) tensors, which is what PEFT writes and reads. Loading
builds every target at ``init_r``, cuts it to its pattern (removing rank-0 adapters) and copies the
tensors after checking every shape.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from ...inject import bias_parameters
from ...io import (
    CONFIG_NAME,
    PREFIX,
    _portable_targets,
    check_and_copy,
    install_adapter,
    normalize_key,
    read_adapter_weights,
    write_adapter_dir,
)
from ...layers.kinds import kind_of
from ...state import require_adapter, trainable_copies
from .config import AdaLoraConfig
from .errors import RankPatternError
from .layer import svd_adapters
from .shrink import shrink

_KEY = re.compile(r"\.lora_([AEB])(?:\.[^.]+)?$")


def save_adalora(model: nn.Module, path: str | Path, adapter_name: str = "default") -> Path:
    """Write AdaLoRA adapter ``adapter_name`` to directory ``path`` in PEFT's format."""
    rec = require_adapter(model, adapter_name)
    config: AdaLoraConfig = rec.config
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    pattern = dict(config.rank_pattern or {})  # keeps adapters removed by shrink (rank 0)
    paths, conv1d = set(), False
    for mpath, ad in svd_adapters(model, adapter_name).items():
        idx = ad.kept.nonzero().flatten()  # masked triplets are not saved (their λ is 0)
        pre = f"{PREFIX}{mpath}"
        tensors[f"{pre}.lora_A"] = ad.lora_A.detach().index_select(0, idx)
        tensors[f"{pre}.lora_E"] = ad.lora_E.detach().index_select(0, idx)
        tensors[f"{pre}.lora_B"] = ad.lora_B.detach().index_select(1, idx)
        pattern[f"{mpath}.lora_E"] = ad.pattern()
        paths.add(mpath)
        conv1d |= model.get_submodule(mpath).kind.name == "conv1d_gpt2"
    for key in list(pattern):
        mpath = key.removesuffix(".lora_E")
        if mpath in paths:
            continue
        base = model.get_submodule(mpath)  # a removed (rank-0) adapter: zero-size tensors, as PEFT
        base = getattr(base, "base_layer", base)
        kind = kind_of(base)
        geometry = kind.geometry(base, 1)
        fan_in, fan_out = math.prod(geometry.a_shape[1:]), geometry.b_shape[0]
        tensors[f"{PREFIX}{mpath}.lora_A"] = torch.zeros(0, fan_in)
        tensors[f"{PREFIX}{mpath}.lora_E"] = torch.zeros(0, 1)
        tensors[f"{PREFIX}{mpath}.lora_B"] = torch.zeros(fan_out, 0)
        paths.add(mpath)
        conv1d |= kind.name == "conv1d_gpt2"
    for cpath, host in trainable_copies(model):
        if adapter_name in host.modules_to_save:
            for key, t in host.modules_to_save[adapter_name].state_dict().items():
                tensors[f"{PREFIX}{cpath}.{key}"] = t
    for name, p in bias_parameters(model, config.bias, adapter_name).items():
        tensors[f"{PREFIX}{name}"] = p
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    full = all(sum(flags) == config.init_r for flags in pattern.values())
    data = config.to_peft_dict()
    data["rank_pattern"] = None if full else {k: pattern[k] for k in sorted(pattern)}
    if config.target_modules == "all-linear":
        data["target_modules"] = _portable_targets(model, config, paths)
    if conv1d:
        data["fan_in_fan_out"] = True  # what PEFT sets for GPT-2's Conv1D
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not data.get("base_model_name_or_path") and name_or_path:
        data["base_model_name_or_path"] = str(name_or_path)
    write_adapter_dir(path, tensors, data)
    return path


def load_adalora(model: nn.Module, path: str | Path, adapter_name: str = "default", trainable: bool = False,
                 raw_config: dict | None = None) -> nn.Module:
    """Load an AdaLoRA adapter saved by PEFT or lorakit into ``model``; on any problem nothing changes.

    The adapter comes back at its allocated ranks (rank-0 matrices are not adapted at all) and is
    active; frozen unless ``trainable``.
    """
    from ...io import read_adapter_config
    from .layer import inject_adalora

    source = str(Path(path) / CONFIG_NAME)
    raw = raw_config if raw_config is not None else read_adapter_config(path)
    config = AdaLoraConfig.from_peft_dict(raw, source=source)
    weights = read_adapter_weights(path)

    def fill() -> None:
        _apply_pattern(model, adapter_name, config, source)
        _copy_weights(model, adapter_name, weights, source)
        shrink(model, adapter_name)  # removes the rank-0 adapters

    return install_adapter(model, path, adapter_name, trainable,
                           inject_fn=lambda: inject_adalora(model, config, adapter_name), fill_fn=fill)


def _apply_pattern(model: nn.Module, adapter_name: str, config: AdaLoraConfig, source: str) -> None:
    adapters = svd_adapters(model, adapter_name)
    pattern, problems = {}, []
    for key, flags in (config.rank_pattern or {}).items():
        mpath = _KEY.sub("", key) if _KEY.search(key) else key
        if mpath not in adapters:
            problems.append(f"{key}: this model has no adapted module {mpath!r}")
            continue
        pattern[mpath] = flags
    if problems:
        raise RankPatternError(
            f"{source}: the rank_pattern does not fit this model ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems[:20])
            + "\nLoad the adapter into the base model it was trained on (same module names and target_modules)."
        )
    config.rank_pattern = {f"{p}.lora_E": f for p, f in pattern.items()} or None
    for mpath, flags in pattern.items():
        adapters[mpath].cut_(torch.tensor(flags, dtype=torch.bool))


def _copy_weights(model: nn.Module, adapter_name: str, weights: dict[str, torch.Tensor], source: str) -> None:
    expected: dict[str, torch.Tensor] = {}
    for mpath, ad in svd_adapters(model, adapter_name).items():
        for role in ("lora_A", "lora_E", "lora_B"):
            expected[f"{PREFIX}{mpath}.{role}"] = getattr(ad, role)
    for cpath, host in trainable_copies(model):
        if adapter_name in host.modules_to_save:
            for key, t in host.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                expected[f"{PREFIX}{cpath}.{key}"] = t
    rec = require_adapter(model, adapter_name)
    for name, p in bias_parameters(model, rec.config.bias, adapter_name).items():
        expected[f"{PREFIX}{name}"] = p
    given = {}
    for key, value in weights.items():
        key = _KEY.sub(lambda m: f".lora_{m.group(1)}", key) if _KEY.search(key) else normalize_key(key)
        if key is not None:
            given[key if key.startswith(PREFIX) else PREFIX + key] = value
    check_and_copy(expected, given, source, hint="same architecture, sizes and rank_pattern",
                   required=lambda key, t: ".lora_" in key and t.numel() > 0)
