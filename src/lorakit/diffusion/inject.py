"""Add one adapter, under one name, to every component of a pipeline (UNet, text encoder(s)).

Each component is a plain ``nn.Module`` and gets an ordinary lorakit adapter; the pipeline-level
functions here only decide the targets and their (rank, α) per module, and undo everything if any
component fails, so a failed call leaves the pipeline as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .._txn import restore, snapshot
from ..errors import ConfigError
from ..state import model_state
from .components import components_of
from .config import DiffusionLoraConfig
from .kinds import FILE_KINDS
from .targets import is_kxk_conv, text_encoder_targets, unet_targets

Plan = dict[str, dict[str, tuple[int, float]]]  # component → {module path: (rank, alpha)}


def plan_targets(components: Mapping[str, nn.Module], config: DiffusionLoraConfig) -> Plan:
    plan: Plan = {}
    for comp, module in components.items():
        if comp == "unet":
            paths = unet_targets(module, config.locon) if config.unet else []
        else:
            paths = text_encoder_targets(module) if config.text_encoder else []
        if paths:
            plan[comp] = {p: config.rank_alpha(is_kxk_conv(module.get_submodule(p))) for p in paths}
    return plan


def add_adapter(pipe: Any, config: DiffusionLoraConfig, name: str = "default") -> dict[str, nn.Module]:
    """Add adapter ``name`` (trainable, active) to the UNet and — with ``config.text_encoder`` — the
    text encoder(s) of ``pipe``; returns the adapted components."""
    if not isinstance(config, DiffusionLoraConfig):  # a dict had no attribute 'unet'
        raise ConfigError(f"add_adapter: config must be a DiffusionLoraConfig (e.g. DiffusionLoraConfig(rank=8)), "
                          f"not a {type(config).__name__}.")
    components = components_of(pipe)
    plan = plan_targets(components, config)
    if not plan:  # e.g. unet=False, text_encoder=True on a pipeline without a text encoder: a silent no-op before
        raise ConfigError(f"add_adapter: nothing to adapt — unet={config.unet}, text_encoder={config.text_encoder} "
                          f"and the pipeline has {sorted(components)}; set unet=True or pass the text encoder(s).")
    kind = FILE_KINDS[config.kind]
    apply_all(components, name, {c: (lambda m, per=per: kind.inject(m, per, config, name)) for c, per in plan.items()})
    return {c: components[c] for c in plan}


def apply_all(components: Mapping[str, nn.Module], name: str, steps: Mapping[str, Callable[[nn.Module], None]]) -> None:
    """Run ``steps[component](module)`` for each component; on any error put every component already
    touched (and the failing one) back exactly as it was — modules, adapters and ``requires_grad``
    (injecting freezes the base, which deleting the adapter again would not undo) — and re-raise."""
    snaps = []
    try:
        for comp, step in steps.items():
            snaps.append(snapshot(components[comp]))
            step(components[comp])
    except BaseException:
        for snap in snaps:
            restore(snap)
        raise


def adapter_components(pipe: Any, name: str) -> dict[str, nn.Module]:
    """The components that hold adapter ``name``."""
    out = {}
    for comp, module in components_of(pipe).items():
        st = model_state(module)
        if st is not None and name in st.adapters:
            out[comp] = module
    return out
