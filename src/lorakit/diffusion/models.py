"""The base model of an image-LoRA run: a local diffusers Stable Diffusion (XL) folder, or ``tiny`` —
a small random-init UNet / VAE / CLIP text encoder built from configs (diffusers' own test sizes), with
a word-hashing tokenizer, for offline demos and tests. The same seed gives the same tiny model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError


def require_diffusers():
    """The diffusers module (an optional dependency of lorakit.diffusion), or a ConfigError saying how to get it."""
    try:
        import diffusers
    except ImportError:
        raise ConfigError("lorakit's image commands need diffusers: pip install 'diffusers>=0.34'.") from None
    return diffusers


class HashTokenizer:
    """Words → ids by a stable hash (no vocabulary file): ``bos w1 … wn eos pad…`` of ``max_length``."""

    def __init__(self, vocab_size: int = 1000, max_length: int = 16):
        self.vocab_size, self.model_max_length = vocab_size, max_length
        self.bos, self.eos, self.pad = 0, 2, 1

    def __call__(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            words = [w for w in text.lower().replace(",", " ").split() if w][: self.model_max_length - 2]
            ids = [3 + int(hashlib.sha1(w.encode()).hexdigest(), 16) % (self.vocab_size - 3) for w in words]
            row = [self.bos, *ids, self.eos]
            rows.append(row + [self.pad] * (self.model_max_length - len(row)))
        return torch.tensor(rows)


@dataclass
class ImageModel:
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenize: Any  # list[str] -> (B, L) ids
    scheduler_config: dict
    source: str

    def components(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    @property
    def latent_scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def tiny_model(seed: int = 0) -> ImageModel:
    d = require_diffusers()
    from transformers import CLIPTextConfig, CLIPTextModel

    AutoencoderKL, UNet2DConditionModel = d.AutoencoderKL, d.UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32)
    te = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32,
                                      intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                      vocab_size=1000, max_position_embeddings=16))
    sched = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "prediction_type": "epsilon"}
    return ImageModel(unet.eval(), vae.eval(), te.eval(), HashTokenizer(1000, 16), sched, "tiny")


#: The subfolders of a diffusers Stable Diffusion folder that an image run reads.
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def load_model(source: str, seed: int = 0) -> ImageModel:
    """``tiny`` or a local diffusers Stable Diffusion 1.x/2.x folder (model_index.json, unet/, vae/, ...)."""
    if source == "tiny":
        return tiny_model(seed)
    path = Path(source)
    if not (path / "model_index.json").is_file():
        raise ConfigError(f"model={source!r}: not 'tiny' and not a local diffusers pipeline folder (no "
                          "model_index.json); download the base model with diffusers first.")
    missing = [sub for sub in PIPELINE_PARTS if not (path / sub).is_dir()]
    if missing:  # transformers read a missing local folder as a hub repo id ("Repo id must be in the form …")
        raise ConfigError(f"model={source!r}: the pipeline folder has no {', '.join(f'{m}/' for m in missing)} "
                          f"(it needs {', '.join(f'{m}/' for m in PIPELINE_PARTS)}); download the whole pipeline with "
                          "diffusers (DiffusionPipeline.from_pretrained(...).save_pretrained(folder)).")
    d = require_diffusers()
    from transformers import CLIPTextModel, CLIPTokenizer

    AutoencoderKL, DDPMScheduler, UNet2DConditionModel = d.AutoencoderKL, d.DDPMScheduler, d.UNet2DConditionModel

    tok = CLIPTokenizer.from_pretrained(path / "tokenizer")

    def tokenize(texts):
        return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    return ImageModel(UNet2DConditionModel.from_pretrained(path / "unet").eval(),
                      AutoencoderKL.from_pretrained(path / "vae").eval(),
                      CLIPTextModel.from_pretrained(path / "text_encoder").eval(), tokenize,
                      dict(DDPMScheduler.from_pretrained(path / "scheduler").config), str(path))
