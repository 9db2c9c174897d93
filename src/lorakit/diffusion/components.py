"""The parts of a diffusion pipeline LoRA adapts, and which base family (SD 1.x/2.x or SDXL) they are.

lorakit works on a *pipeline-like* object: a diffusers ``StableDiffusion(XL)Pipeline`` or a plain
mapping ``{"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel, "text_encoder_2": ...}``.
Each component is an ordinary ``nn.Module`` that gets its own lorakit adapter of the same name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from torch import nn

from ..errors import ConfigError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
Family = Literal["sd1", "sdxl"]


def components_of(pipe: Any) -> dict[str, nn.Module]:
    """``{name: module}`` of the UNet and text encoder(s) present in ``pipe`` (pipeline or mapping)."""
    if isinstance(pipe, Mapping):
        found = {k: pipe[k] for k in COMPONENTS if pipe.get(k) is not None}
        unknown = sorted(set(pipe) - set(COMPONENTS))
        if unknown:
            raise ConfigError(f"components {unknown}: lorakit adapts only {', '.join(COMPONENTS)}; "
                              "pass a mapping with those keys (or a diffusers pipeline).")
    else:
        found = {k: getattr(pipe, k) for k in COMPONENTS if getattr(pipe, k, None) is not None}
    for name, module in found.items():
        if not isinstance(module, nn.Module):
            raise ConfigError(f"component {name!r} is a {type(module).__name__}, not a torch module.")
    if "unet" not in found:
        raise ConfigError("no 'unet' component: pass a diffusers pipeline or {'unet': ..., 'text_encoder': ...}.")
    return found


def family_of(components: Mapping[str, nn.Module]) -> Family:
    """SDXL when there is a second text encoder or the UNet takes SDXL's text_time conditioning."""
    cfg = getattr(components["unet"], "config", None)
    if "text_encoder_2" in components or getattr(cfg, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return "sd1"


def layers_per_block(unet: nn.Module) -> int:
    lpb = getattr(getattr(unet, "config", None), "layers_per_block", None)
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise ConfigError(f"UNet layers_per_block={lpb}: SGM names need the same count in every block.")
        lpb = lpb[0]
    if not isinstance(lpb, int):
        raise ConfigError("the UNet has no config.layers_per_block; is it a diffusers UNet2DConditionModel?")
    return lpb


def up_blocks_with_attention(unet: nn.Module) -> dict[int, bool]:
    blocks = getattr(unet, "up_blocks", [])
    return {i: bool(getattr(b, "attentions", None)) for i, b in enumerate(blocks)}
