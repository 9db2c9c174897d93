"""diffusers → SGM names for the real SDXL UNet layout (layers_per_block=2; up_blocks 0, 1 with
attention), against names found in kohya SDXL LoRA files."""

from __future__ import annotations

import pytest

from lorakit.diffusion.sgm import to_sgm

UP_ATTN = {0: True, 1: True, 2: False}


@pytest.mark.parametrize("path,sgm", [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2", "input_blocks.8.1.transformer_blocks.9.ff.net.2"),
    ("down_blocks.2.resnets.0.conv_shortcut", "input_blocks.7.0.skip_connection"),
    ("down_blocks.0.resnets.1.time_emb_proj", "input_blocks.2.0.emb_layers.1"),
    ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
    ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
    ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
    ("up_blocks.0.attentions.2.proj_out", "output_blocks.2.1.proj_out"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.1.resnets.0.conv1", "output_blocks.3.0.in_layers.2"),
    ("up_blocks.2.resnets.2.conv2", "output_blocks.8.0.out_layers.3"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("conv_in", "input_blocks.0.0"),
])
def test_sdxl_sgm_names(path, sgm):
    assert to_sgm(path, 2, UP_ATTN) == sgm


def test_upsampler_of_a_block_without_attention_is_index_1():
    assert to_sgm("up_blocks.2.upsamplers.0.conv", 2, UP_ATTN) == "output_blocks.8.1.conv"
    assert to_sgm("not.a.unet.path", 2, UP_ATTN) is None
