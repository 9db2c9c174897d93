"""NEFTune: noisy embeddings during instruction fine-tuning (Jain et al. 2023, arXiv 2310.05914).

Algorithm 1 of the paper: while training, the input embeddings ``X_emb`` (B, L, d) get uniform noise
``ε ~ U(-1, 1)`` scaled by ``α / √(L·d)``::

    X_emb ← X_emb + (α / √(L·d)) · ε

with L the sequence length and d the embedding width; α is ``neftune_alpha`` (the paper uses 5, 10
and 15). As in TRL's and transformers' implementations L is the batch's padded length. Evaluation and
generation (the module in eval mode) see the clean embeddings. The noise is drawn from torch's global
generator, which the run seeds and checkpoints, so runs and resumes repeat.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .hooks import BaseHook, HookContext


def neftune_forward_hook(alpha: float):
    """A forward hook for an embedding module that adds the scaled uniform noise in training mode."""
    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        length, dim = output.shape[-2], output.shape[-1]  # output: (B, L, d)
        scale = alpha / math.sqrt(length * dim)
        return output + torch.empty_like(output).uniform_(-scale, scale)

    return hook


class NEFTuneHook(BaseHook):
    """Registers the noise on the model's input embeddings for the run and removes it at the end."""

    def __init__(self, alpha: float):
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"neftune_alpha={alpha!r}: must be a positive number (the paper uses 5).")
        self.alpha = float(alpha)
        self.handle = None

    def on_train_start(self, ctx: HookContext) -> None:
        embeddings = ctx.model.get_input_embeddings() if hasattr(ctx.model, "get_input_embeddings") else None
        if embeddings is None:
            raise ConfigError("neftune_alpha: this model exposes no input embeddings "
                              "(get_input_embeddings()); set neftune_alpha=0.")
        self.handle = embeddings.register_forward_hook(neftune_forward_hook(self.alpha))

    def on_train_end(self, ctx: HookContext) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
