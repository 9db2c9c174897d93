"""diffusers UNet module paths ↔ the SGM / LDM names that kohya's SDXL UNet uses.

kohya-ss/sd-scripts trains SD 1.x/2.x on a UNet whose modules carry diffusers' names
(``down_blocks.1.attentions.0...``), but SDXL on its own SGM-style UNet (``input_blocks.4.1...``), so
SDXL LoRA files name modules the SGM way. With L = layers_per_block the block layout is::

    diffusers                                 SGM
    conv_in                                   input_blocks.0.0
    down_blocks.i.resnets.j                   input_blocks.(1 + (L+1)·i + j).0
    down_blocks.i.attentions.j                input_blocks.(1 + (L+1)·i + j).1
    down_blocks.i.downsamplers.0.conv         input_blocks.((L+1)·(i+1)).0.op
    mid_block.resnets.0 / attentions.0 / resnets.1   middle_block.0 / .1 / .2
    up_blocks.i.resnets.j                     output_blocks.((L+1)·i + j).0
    up_blocks.i.attentions.j                  output_blocks.((L+1)·i + j).1
    up_blocks.i.upsamplers.0.conv             output_blocks.((L+1)·i + L).2.conv  (.1.conv without attention)
    time_embedding.linear_1 / linear_2        time_embed.0 / time_embed.2
    add_embedding.linear_1 / linear_2         label_emb.0.0 / label_emb.0.2
    conv_norm_out / conv_out                  out.0 / out.2

and inside a ResNet block: norm1 → in_layers.0, conv1 → in_layers.2, time_emb_proj → emb_layers.1,
norm2 → out_layers.0, conv2 → out_layers.3, conv_shortcut → skip_connection. Attention blocks keep
their inner names (proj_in, transformer_blocks.0.attn1.to_q, ff.net.0.proj, ...).
"""

from __future__ import annotations

import re

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet_rest(rest: str) -> str:
    head, _, tail = rest.partition(".")
    new = _RESNET.get(head, head)
    return f"{new}.{tail}" if tail else new


def to_sgm(path: str, layers_per_block: int, up_has_attention: dict[int, bool]) -> str | None:
    """The SGM name of diffusers UNet module ``path`` (None for a path outside the mapped layout)."""
    n = layers_per_block + 1
    if path in _TOP:
        return _TOP[path]
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        i, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + n * i + j
        return f"input_blocks.{idx}.0.{_resnet_rest(rest)}" if part == "resnets" else f"input_blocks.{idx}.1.{rest}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path)
    if m:
        return f"input_blocks.{n * (int(m[1]) + 1)}.0.op"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        part, j, rest = m[1], int(m[2]), m[3]
        if part == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{0 if j == 0 else 2}.{_resnet_rest(rest)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        i, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = n * i + j
        return f"output_blocks.{idx}.0.{_resnet_rest(rest)}" if part == "resnets" else f"output_blocks.{idx}.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path)
    if m:
        i = int(m[1])
        return f"output_blocks.{n * i + layers_per_block}.{2 if up_has_attention.get(i) else 1}.conv"
    return None
