"""Module names in single-file diffusion LoRAs (kohya-ss/sd-scripts, LyCORIS, A1111, ComfyUI).

A file names a module ``<prefix><path with '.' → '_'>``:

    prefix        component                 path spelling
    lora_unet_    unet                      SD 1.x/2.x: diffusers paths; SDXL: SGM paths (see sgm.py)
    lora_te_      text_encoder (SD 1.x/2.x) transformers paths, e.g. text_model_encoder_layers_0_mlp_fc1
    lora_te1_     text_encoder (SDXL)       (diffusers' own converter also writes it for SD 1.x)
    lora_te2_     text_encoder_2 (SDXL)

'_' → '.' is ambiguous (``to_q``, ``proj_in``), so names are resolved against the model's own
modules: every Linear/Conv module gets its name(s), and a file's names are looked up in that table.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..layers.host import LoraLayer
from .components import Family, layers_per_block, up_blocks_with_attention
from .sgm import to_sgm

SGM_MARKERS = ("input_blocks", "middle_block", "output_blocks")


def text_prefix(component: str, family: Family) -> str:
    if component == "text_encoder_2":
        return "lora_te2_"
    return "lora_te1_" if family == "sdxl" else "lora_te_"


def _adaptable(module: nn.Module) -> list[str]:
    out = []
    for path, m in module.named_modules():
        base = m.base_layer if isinstance(m, LoraLayer) else m
        if isinstance(base, (nn.Linear, nn.Conv2d)) and ".base_layer" not in path and ".lora." not in path:
            out.append(path)
    return out


def clip_path(path: str) -> str:
    """kohya's spelling of a CLIP text encoder path: transformers < 5 nested the encoder under
    ``text_model.``, and every kohya/A1111 file keeps that (``lora_te_text_model_encoder_layers_0_…``)."""
    return path if path.startswith("text_model.") else "text_model." + path


def flat(path: str) -> str:
    return path.replace(".", "_")


def write_name(component: str, path: str, family: Family, unet: nn.Module | None = None) -> str:
    """The name lorakit writes: SGM paths for an SDXL UNet (kohya's SDXL spelling)."""
    if component == "unet":
        if family == "sdxl" and unet is not None:
            sgm = to_sgm(path, layers_per_block(unet), up_blocks_with_attention(unet))
            if sgm is not None:
                return "lora_unet_" + flat(sgm)
        return "lora_unet_" + flat(path)
    return text_prefix(component, family) + flat(clip_path(path))


def name_table(components: Mapping[str, nn.Module], family: Family) -> dict[str, tuple[str, str]]:
    """file module name → (component, module path), every spelling a reader should accept."""
    table: dict[str, tuple[str, str]] = {}
    for comp, module in components.items():
        for path in _adaptable(module):
            if comp == "unet":
                table["lora_unet_" + flat(path)] = (comp, path)  # diffusers spelling (SD1; SDXL via diffusers)
                if family == "sdxl":
                    table[write_name(comp, path, family, module)] = (comp, path)
            else:
                prefixes = [text_prefix(comp, family)]
                if comp == "text_encoder":  # lora_te_ and lora_te1_ both name the first text encoder
                    prefixes.append("lora_te_" if family == "sdxl" else "lora_te1_")
                for prefix in prefixes:
                    for spelling in dict.fromkeys((clip_path(path), path)):
                        table[prefix + flat(spelling)] = (comp, path)
    return table


def foreign_base_hint(names: list[str], family: Family, components: Mapping[str, nn.Module]) -> str:
    """Why unknown names may come from a LoRA for another base model (SD 1.x/2.x vs SDXL)."""
    if any(n.startswith("lora_te2_") for n in names) and "text_encoder_2" not in components:
        return ("it has lora_te2_ keys (a second text encoder): it is an SDXL LoRA — load it into an SDXL "
                "pipeline (UNet + text_encoder + text_encoder_2)")
    if family == "sd1" and any(any(m in n for m in SGM_MARKERS) for n in names):
        return ("its UNet keys use SGM block names (input_blocks / middle_block / output_blocks), kohya's SDXL "
                "spelling: it is an SDXL LoRA — load it into an SDXL pipeline")
    if not any(n.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for n in names):
        return ("its names have none of the prefixes lora_unet_ / lora_te_ / lora_te1_ / lora_te2_: it is not "
                "a kohya/LyCORIS Stable Diffusion LoRA (a Flux/SD3/video LoRA, or diffusers format?)")
    return ("the modules do not exist in this pipeline: the LoRA was trained on another base model "
            "(SD 1.x vs 2.x vs SDXL, or another architecture) — load it into the base it was trained on")
