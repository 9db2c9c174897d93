"""Learning-rate schedules as pure functions of the step.

Each optimizer param group keeps its own peak rate in ``group["base_lr"]`` (LoRA+ gives B a larger
one); before step ``s`` the loop sets ``group["lr"] = group["base_lr"] · lr_factor(s, ...)``. The factor
depends on the step alone, so a resumed run needs no scheduler state, and the optimizer's own
state dict carries every ``base_lr``.

    warm-up   s < w:  (s + 1) / w                    (the first step already moves, at lr / w)
    linear    then 1 − (s − w) / (T − w)            (down to 1/(T − w) at the last step)
    cosine    then ½ · (1 + cos(π · (s − w) / (T − w)))
    constant  then 1
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")  # TrainArgs validates first


def init_base_lr(optimizer: torch.optim.Optimizer) -> None:
    """Record each group's peak rate as ``base_lr`` (once; groups that have one keep it)."""
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])


def apply_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's lr for this step; returns the first group's (for the log)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]
