"""Tiny random-init Stable Diffusion parts built from configs (diffusers' own test sizes; no hub)."""

from __future__ import annotations

import torch


def tiny_unet(seed: int = 0, sdxl: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(block_out_channels=(32, 64), sample_size=16, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    if sdxl:
        return UNet2DConditionModel(**common, layers_per_block=2, attention_head_dim=(2, 4),
                                    use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                    projection_class_embeddings_input_dim=80, cross_attention_dim=64).eval()
    return UNet2DConditionModel(**common, layers_per_block=1, attention_head_dim=8, cross_attention_dim=32).eval()


def tiny_clip(seed: int = 1, hidden: int = 32, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=hidden, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=100,
                         projection_dim=32)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def sd1_parts(seed: int = 0) -> dict:
    return {"unet": tiny_unet(seed), "text_encoder": tiny_clip(seed + 1)}


def sdxl_parts(seed: int = 0) -> dict:
    return {"unet": tiny_unet(seed, sdxl=True), "text_encoder": tiny_clip(seed + 1),
            "text_encoder_2": tiny_clip(seed + 2, projection=True)}


def unet_inputs(sdxl: bool = False, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10, 500])
    ctx = torch.randn(2, 7, 64 if sdxl else 32, generator=g)
    kw = {}
    if sdxl:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g),
                                   "time_ids": torch.randn(2, 6, generator=g)}
    return x, t, ctx, kw


def unet_out(unet, sdxl: bool = False):
    x, t, ctx, kw = unet_inputs(sdxl)
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx, **kw).sample


def te_out(te):
    ids = torch.tensor([[0, 5, 9, 17, 2, 1, 1]])
    with torch.no_grad():
        return te(ids)[0]


def randomize(components: dict, name: str = "default", seed: int = 5) -> None:
    """Give every adapter factor random values (a trained-looking, non-zero ΔW)."""
    from lorakit.state import lora_layers

    g = torch.Generator().manual_seed(seed)
    for module in components.values():
        for _, host in lora_layers(module):
            if name in host.lora:
                for p in host.lora[name].parameters():
                    with torch.no_grad():
                        p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def tiny_pipeline(parts: dict):
    """A StableDiffusionPipeline around ``parts`` (no tokenizer: the LoRA loaders do not need one)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return StableDiffusionPipeline(vae=vae, text_encoder=parts["text_encoder"], tokenizer=None, unet=parts["unet"],
                                   scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
