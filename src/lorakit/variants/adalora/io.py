"""AdaLoRA adapter files (PEFT's ``peft_type: "ADALORA"``) go through the one adapter-file path,
``lorakit.io``; the format is described in ``lorakit.adapter_kinds.adalora``. These names stay for
callers that want to say "AdaLoRA" explicitly."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ...errors import AdapterFileError
from ...io import CONFIG_NAME, load_adapter, read_adapter_config, save_adapter
from ...state import require_adapter
from .layer import KIND


def save_adalora(model: nn.Module, path: str | Path, adapter_name: str = "default") -> Path:
    """Write AdaLoRA adapter ``adapter_name`` to directory ``path`` in PEFT's format."""
    rec = require_adapter(model, adapter_name)
    if rec.kind != KIND:
        raise AdapterFileError(f"adapter {adapter_name!r} is a {rec.kind} adapter, not AdaLoRA; save it with "
                               "lorakit.save_adapter.")
    return save_adapter(model, path, adapter_name)


def load_adalora(model: nn.Module, path: str | Path, adapter_name: str = "default", trainable: bool = False,
                 raw_config: dict | None = None) -> nn.Module:
    """Load an AdaLoRA adapter saved by PEFT or lorakit into ``model``; on any problem nothing changes.
    The adapter comes back at its allocated ranks (rank-0 matrices are not adapted at all) and is
    active; frozen unless ``trainable``."""
    raw = raw_config if raw_config is not None else read_adapter_config(path)
    if raw.get("peft_type") != "ADALORA":
        raise AdapterFileError(f"{Path(path) / CONFIG_NAME}: peft_type is {raw.get('peft_type')!r}, not 'ADALORA'; "
                               "load it with lorakit.load_adapter.")
    return load_adapter(model, path, adapter_name, trainable)
