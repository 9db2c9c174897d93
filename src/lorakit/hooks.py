"""The training loop's extension points (in the core so that variants, below the training package,
can provide hooks without importing it; ``lorakit.train.hooks`` re-exports them). Variants (AdaLoRA's rank allocator, O-LoRA's orthogonality
loss, self-distillation, ...) are hooks; the loop itself stays one readable function.

The loop calls, in order, for every optimizer step::

    hook.on_train_start(ctx)                      once, after the model/optimizer exist
    loss = task_loss + Σ hook.extra_loss(ctx)     per micro-batch (None = nothing to add)
    loss.backward()
    hook.after_backward(ctx)                      once per optimizer step, after the last micro-batch's
                                                  backward and gradient unscale/clip, BEFORE
                                                  optimizer.step() (AdaLoRA reads |w·∇w| here)
    optimizer.step(); optimizer.zero_grad()
    hook.after_step(ctx)                          after the update (AdaLoRA masks λ here)
    hook.on_train_end(ctx)                        once; may write files into ctx.output_dir

``ctx`` is a :class:`HookContext`. A hook may replace ``ctx.optimizer`` in ``on_train_start`` or
``after_step`` (e.g. after AdaLoRA physically shrinks its factors) — the loop re-reads it.

What ``lorakit.train.loop`` provides (details in docs/TRAINING.md):

* ``ctx.model`` is the unwrapped model (never the DDP/FSDP wrapper); ``ctx.extra`` holds
  ``"accelerator"``, ``"args"`` (the run's ``TrainArgs``) and ``"tokenizer"``.
* ``extra_loss`` is called once per micro-batch inside autocast; the loop adds it with weight
  ``1 / grad_accum``, so a step counts it once whatever the accumulation.
* ``state_dict()`` goes into every checkpoint (``hooks.pt``, read with ``weights_only=True``: tensors
  and plain data only); on resume ``load_state_dict`` runs before the trainable weights are loaded,
  so a hook may first give its parameters the checkpoint's shapes.
* Parameter groups of a replacement optimizer keep their schedule if they carry ``"base_lr"`` (the
  peak rate); groups without it are taken to be at the current step's rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class HookContext:
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    step: int  # optimizer steps done so far (0-based during the step)
    total_steps: int
    output_dir: Path | None = None
    log: dict[str, float] = field(default_factory=dict)  # hooks may add scalars to the step's log
    extra: dict[str, Any] = field(default_factory=dict)


class TrainHook(Protocol):
    def on_train_start(self, ctx: HookContext) -> None: ...
    def extra_loss(self, ctx: HookContext) -> torch.Tensor | None: ...
    def after_backward(self, ctx: HookContext) -> None: ...
    def after_step(self, ctx: HookContext) -> None: ...
    def on_train_end(self, ctx: HookContext) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...  # saved in checkpoints; tensors allowed
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BaseHook:
    """No-op defaults; subclass and override what you need."""

    def on_train_start(self, ctx: HookContext) -> None:
        pass

    def extra_loss(self, ctx: HookContext) -> torch.Tensor | None:
        return None

    def after_backward(self, ctx: HookContext) -> None:
        pass

    def after_step(self, ctx: HookContext) -> None:
        pass

    def on_train_end(self, ctx: HookContext) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
