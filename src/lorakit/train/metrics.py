"""Loss, perplexity and accuracy of a model on encoded examples (``lorakit.data.encode``).

* causal LM: mean cross-entropy over target tokens (labels ≠ -100), perplexity = exp(loss), and
  next-token accuracy (argmax = label) over the same tokens;
* classifier: mean cross-entropy over rows and classification accuracy; no perplexity.

Sums are reduced over processes when an ``accelerate.Accelerator`` is given: each process scores a
strided shard, and every process runs the same number of batches (a process that runs out repeats a
row with weight 0), so sharded (FSDP) models stay in step.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..data.batches import IGNORE, batch_loss_sum, collate


@dataclass(frozen=True)
class LossMetrics:
    loss: float
    perplexity: float | None
    accuracy: float
    targets: int  # tokens (LM) or rows (classifier) scored

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        ppl = f", perplexity {self.perplexity:.3f}" if self.perplexity is not None else ""
        return f"loss {self.loss:.4f}{ppl}, accuracy {100 * self.accuracy:.1f}% ({self.targets} targets)"


@torch.no_grad()
def evaluate_loss(model, examples: list[dict[str, Any]], pad_id: int, batch_size: int = 16,
                  accelerator=None, autocast=None) -> LossMetrics:
    """Score ``model`` on ``examples``; the model's train/eval mode is restored afterwards."""
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    shard = examples[rank::world]
    n_batches = math.ceil(math.ceil(len(examples) / world) / batch_size) if examples else 0
    device = next(model.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, targets
    was_training = model.training
    model.eval()
    try:
        for b in range(n_batches):
            rows = shard[b * batch_size:(b + 1) * batch_size]
            weight = 1.0
            if not rows:  # this shard ran out: keep collective ops in step, count nothing
                rows, weight = examples[:1], 0.0
            batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
            labels = batch.pop("labels")
            with autocast() if autocast is not None else nullcontext():
                logits = model(**batch).logits
            sums[0] += weight * float(batch_loss_sum(logits, labels))
            correct, count = _correct(logits, labels)
            sums[1] += weight * correct
            sums[2] += weight * count
    finally:
        model.train(was_training)
    if accelerator is not None and world > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    loss_sum, correct, count = sums.tolist()
    if count == 0:
        return LossMetrics(float("nan"), None, 0.0, 0)
    loss = loss_sum / count
    is_lm = bool(examples) and "labels" in examples[0]
    ppl = math.exp(min(loss, 700.0)) if is_lm else None
    return LossMetrics(loss, ppl, correct / count, int(count))


def _correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    if labels.dim() == 1:
        return float((logits.argmax(-1) == labels).sum()), float(labels.numel())
    pred = logits[:, :-1, :].argmax(-1)  # (B, T-1)
    target = labels[:, 1:]
    mask = target != IGNORE
    return float(((pred == target) & mask).sum()), float(mask.sum())
