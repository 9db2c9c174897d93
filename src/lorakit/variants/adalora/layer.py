"""AdaLoRA's adapter (``SVDAdapter``, ΔW = P·diag(λ)·Q·scaling, Zhang et al. 2023 §3.1) is an adapter
kind of the core (``lorakit.adapter_kinds.adalora``); this module adds it to a model through the one
``inject`` path."""

from __future__ import annotations

from torch import nn

from ...adapter_kinds.adalora import ADALORA, INIT_STD, Cut, SVDAdapter, svd_adapters
from ...adapter_kinds.adalora_config import AdaLoraConfig
from ...errors import ConfigError
from ...inject import inject

KIND = ADALORA.name


def inject_adalora(model: nn.Module, config: AdaLoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add an AdaLoRA adapter named ``adapter_name`` to ``model`` (in place) and return the model.

    Every target gets ``init_r`` triplets; the adapter becomes the active and trainable one and the
    rest of the model is frozen (``modules_to_save``, ``bias``, ``layers_to_transform`` as for LoRA).
    Train it with the AdaLoRA hook (lorakit's loop does that for ``--method adalora``) or call
    ``RankAllocator.step`` after each backward. Same as ``lorakit.inject(model, config, name)``.
    """
    if not isinstance(config, AdaLoraConfig):
        raise ConfigError(f"config must be a lorakit.variants.adalora.AdaLoraConfig, got {type(config).__name__}.")
    return inject(model, config, adapter_name, kind=ADALORA)


__all__ = ["INIT_STD", "KIND", "Cut", "SVDAdapter", "inject_adalora", "svd_adapters"]
