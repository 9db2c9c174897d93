"""Preview images during training: fixed prompts × fixed seeds, sampled with DDIM, saved as one PNG grid
(one row per prompt, one column per seed) — the same noise every time, so grids show what changed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .._fs import atomic_write
from .models import require_diffusers


@torch.no_grad()
def sample(model, prompts: list[str], seeds: list[int], size: tuple[int, int], steps: int = 10,
           guidance: float = 1.0) -> torch.Tensor:
    """(len(prompts)·len(seeds), 3, H, W) images in [-1, 1]; noise from ``seeds`` (CPU generators)."""
    DDIMScheduler = require_diffusers().DDIMScheduler
    sched = DDIMScheduler.from_config({k: v for k, v in model.scheduler_config.items() if not k.startswith("_")})
    sched.set_timesteps(steps)
    w, h = size
    f = model.vae_factor
    ctx = model.text_encoder(model.tokenize(list(prompts)))[0]  # (P, L, D)
    ctx = ctx.repeat_interleave(len(seeds), 0)
    latents = torch.cat([torch.randn(1, 4, h // f, w // f, generator=torch.Generator().manual_seed(s))
                         for _ in prompts for s in seeds])
    uncond = model.text_encoder(model.tokenize([""]))[0].expand_as(ctx) if guidance != 1.0 else None
    latents = latents * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = model.unet(latents, t, encoder_hidden_states=ctx).sample
        if uncond is not None:
            eps_u = model.unet(latents, t, encoder_hidden_states=uncond).sample
            eps = eps_u + guidance * (eps - eps_u)
        latents = sched.step(eps, t, latents).prev_sample
    return model.vae.decode(latents / model.latent_scale).sample.clamp(-1, 1)


def save_grid(images: torch.Tensor, rows: int, path: Path) -> None:
    from PIL import Image

    n, _, h, w = images.shape
    cols = n // rows
    arr = ((images.permute(0, 2, 3, 1).float().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = arr[i]
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
