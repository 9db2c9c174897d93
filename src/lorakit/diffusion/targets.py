"""Which modules of a UNet / CLIP text encoder get an adapter — kohya's selection.

kohya-ss/sd-scripts (networks/lora.py) adapts every ``Linear`` and ``Conv2d`` inside these blocks:

* UNet attention: ``Transformer2DModel`` — proj_in, proj_out, attn1/attn2 to_q/to_k/to_v/to_out.0,
  ff.net.0.proj, ff.net.2 (``lora``);
* UNet ResNet / down- / up-sampling: ``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D`` — conv1,
  conv2, conv_shortcut, time_emb_proj, the sampler convs (``locon``: LoRA on convolutions). Their
  k×k convolutions (k > 1) get ``conv_rank`` / ``conv_alpha``; their 1×1 convs and Linears get the
  ordinary rank and alpha;
* CLIP text encoders: ``CLIPAttention`` (q/k/v/out_proj) and ``CLIPMLP`` (fc1, fc2).

Matching is by class name, as kohya does, so no diffusers/transformers import is needed here.
"""

from __future__ import annotations

from torch import nn

from ..layers.host import LoraLayer

ATTENTION_BLOCKS = ("Transformer2DModel",)
CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


def _is_target_type(module: nn.Module) -> bool:
    # a module that already carries adapters is a host around its Linear / Conv2d (``base_layer``):
    # the host is the target, never the wrapped layer or an adapter's own factors
    base = module.base_layer if isinstance(module, LoraLayer) else module
    return type(base) in (nn.Linear, nn.Conv2d)


def is_kxk_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def select(model: nn.Module, blocks: tuple[str, ...]) -> list[str]:
    """Paths of the Linear / Conv2d modules inside any module whose class name is in ``blocks``."""
    out: dict[str, None] = {}
    for path, module in model.named_modules():
        if type(module).__name__ in blocks:
            hosts: list[str] = []
            for sub, child in module.named_modules():  # pre-order: a host comes before its insides
                if not sub or any(sub.startswith(h + ".") for h in hosts):
                    continue
                if isinstance(child, LoraLayer):
                    hosts.append(sub)
                if _is_target_type(child):
                    out[f"{path}.{sub}" if path else sub] = None
    return list(out)


def unet_targets(unet: nn.Module, locon: bool) -> list[str]:
    paths = select(unet, ATTENTION_BLOCKS)
    if locon:
        paths += [p for p in select(unet, CONV_BLOCKS) if p not in paths]
    return paths


def text_encoder_targets(text_encoder: nn.Module) -> list[str]:
    return select(text_encoder, TEXT_BLOCKS)
