"""LoRA variants: each plugs into the core through the adapter contract (``factors()``,
``delta_2d()``) and, where it needs one, its own config and file format.

* ``loraplus``  — optimizer parameter groups (B's learning rate = ratio × A's)
* ``adalora``   — SVD-form adapters + a training-time rank allocator
* ``olora``     — orthogonal subspaces for continual learning (an adapter kind + a loss term)
* ``expand``    — LLaMA-Pro block expansion (a model transform)
"""

from __future__ import annotations


def save_variant(model, path, adapter_name):
    from ..errors import ConfigError
    from ..state import require_adapter

    kind = require_adapter(model, adapter_name).kind
    if kind == "adalora":
        from .adalora import save_adalora

        return save_adalora(model, path, adapter_name)
    if kind == "olora":
        from .olora import export_lora  # past + current factors as one plain PEFT LoRA adapter

        return export_lora(model, path, adapter_name)
    raise ConfigError(f"adapter {adapter_name!r} is a {kind} adapter, which has no file format yet.")


def load_variant(model, path, adapter_name, trainable, raw_config):
    from ..errors import ConfigError

    if raw_config.get("peft_type") == "ADALORA":
        try:
            from .adalora import load_adalora
        except ImportError:
            raise ConfigError(f"{path}: AdaLoRA adapters are not supported by this lorakit build.") from None
        return load_adalora(model, path, adapter_name, trainable, raw_config)
    raise ConfigError(f"{path}: peft_type {raw_config.get('peft_type')!r} is not supported.")
