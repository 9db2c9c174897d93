"""The study's fine-tunes: one method label → one short SFT run on a copy of the base model.

Labels: ``full`` (every weight), ``lora-rN`` (LoRA, rank N, α = 2N, all linear layers),
``dora-rN`` (DoRA: the same, with a trained magnitude per output row, Liu et al. 2024 §4),
and ``<label>+replay`` (self-replay: a fraction of every run's rows are the base model's own answers
to prompts it wrote itself — ``lorakit.variants.self_replay``).

The loop is the textbook one (AdamW, linear decay, gradient clipping 1.0) written out here rather
than ``lorakit train``: the CLI job also writes checkpoints, an artifact and a time estimate per run
(about 90 s per run on the shared 2-core box), which the study's budget cannot afford. The loss is
the cross-entropy of the answer tokens only, with the output head applied to those positions only.
"""

from __future__ import annotations

import copy
import random
import re
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...config import LoraConfig
from ...data.batches import collate
from ...data.encode import IGNORE
from ...errors import ConfigError
from ...inject import inject
from .scores import selected_logits

_LABEL = re.compile(r"^(full|lora-r(\d+)|dora-r(\d+))(\+replay)?$")


@dataclass(frozen=True)
class Method:
    label: str
    kind: str  # "full", "lora" or "dora"
    r: int = 0
    replay: bool = False


def parse_methods(spec: str) -> list[Method]:
    """``"full,lora-r8,dora-r8,lora-r8+replay"`` → methods; an unknown label names the accepted forms."""
    out = []
    for label in [s.strip() for s in spec.split(",") if s.strip()]:
        m = _LABEL.match(label)
        if m is None or (m.group(1) != "full" and int(m.group(2) or m.group(3)) <= 0):
            raise ConfigError(f"study method {label!r}: use full, lora-rN, dora-rN (N > 0), each optionally "
                              "followed by +replay, e.g. --methods full,lora-r8,lora-r8+replay")
        kind = m.group(1).split("-")[0]
        out.append(Method(label, kind, int(m.group(2) or m.group(3) or 0), bool(m.group(4))))
    if not out:
        raise ConfigError("study: --methods is empty; give at least one method, e.g. lora-r8")
    return out


@dataclass(frozen=True)
class Schedule:
    steps: int = 16
    batch_size: int = 8
    lr: float = 1e-3  # adapters
    full_lr: float = 1e-4  # full fine-tuning: one rate for both would make one of them look bad
    replay: float = 0.25  # fraction of the rows that are replayed, for +replay methods


def prepare(base, method: Method) -> torch.nn.Module:
    """A trainable copy of ``base`` for ``method`` (the base itself is never touched)."""
    model = copy.deepcopy(base)
    if method.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        inject(model, LoraConfig(r=method.r, lora_alpha=2 * method.r, target_modules="all-linear",
                                 use_dora=method.kind == "dora"))
    return model.train()


def mix(target: list[dict], replayed: list[dict], fraction: float, seed: int) -> list[dict]:
    """``target`` plus replayed rows making up ``fraction`` of the result (drawn with replacement if short)."""
    if fraction <= 0 or not replayed:
        return list(target)
    n = max(1, round(len(target) * fraction / (1.0 - fraction)))
    g = random.Random(seed + 11)
    picked = [replayed[g.randrange(len(replayed))] for _ in range(n)] if len(replayed) < n else g.sample(replayed, n)
    return target + picked


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the labelled (answer) tokens of ``batch``."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = selected_logits(model, batch, keep)
    return F.cross_entropy(logits, targets[keep].to(logits.device))


def fine_tune(model, examples: list[dict], pad_id: int, lr: float, sched: Schedule, seed: int) -> dict:
    """Train ``model`` in place for ``sched.steps`` steps on shuffled ``examples``; loss curve and seconds."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / sched.steps)
    order: list[int] = []
    g = random.Random(seed)
    losses = []
    t0 = time.perf_counter()
    for _ in range(sched.steps):
        while len(order) < sched.batch_size:  # epochs of a fresh permutation each
            perm = list(range(len(examples)))
            g.shuffle(perm)
            order += perm
        idx, order = order[:sched.batch_size], order[sched.batch_size:]
        loss = answer_loss(model, collate([examples[i] for i in idx], pad_id))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return {"losses": losses, "seconds": time.perf_counter() - t0, "trainable": sum(p.numel() for p in params)}
