"""Which examples each process sees at each optimizer step: a pure function of (seed, step).

Step ``s`` of a run uses the global batch ``G = batch_size × grad_accum × world_size`` examples
``perm_e[k·G : (k+1)·G]`` (wrapping around to the epoch's start for the last, short batch), where
``e, k = divmod(s, steps_per_epoch)`` and ``perm_e`` is a permutation seeded by ``(seed, e)``.
Micro-batch ``m`` of process ``r`` is the slice ``[(m·W + r)·b, (m·W + r + 1)·b)`` of that global
batch. So:

* resuming at step ``s`` needs nothing but ``s`` (no sampler state to save), and
* one process with ``batch_size=4`` and two with ``batch_size=2`` see the same global batches —
  together with the token-count normalization in the loop, they compute the same gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..losses import chunked_cross_entropy, hidden_states_instead_of_logits
from .encode import IGNORE


@dataclass
class BatchPlan:
    n: int  # examples
    batch_size: int  # per process per micro-batch
    grad_accum: int
    world_size: int
    seed: int

    def __post_init__(self) -> None:
        self._perm: tuple[int, list[int]] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.n / self.global_batch))

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        return max_steps if max_steps is not None else max(1, math.ceil(epochs * self.steps_per_epoch))

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of optimizer step ``step`` (0-based)."""
        return divmod(step, self.steps_per_epoch)

    def permutation(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._perm[1]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Example indices of each micro-batch process ``rank`` runs at optimizer step ``step``."""
        epoch, k = self.position(step)
        perm = self.permutation(epoch)
        G, b, W = self.global_batch, self.batch_size, self.world_size
        chosen = [perm[(k * G + j) % self.n] for j in range(G)]
        return [chosen[(m * W + rank) * b:(m * W + rank + 1) * b] for m in range(self.grad_accum)]


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: (B, T) input_ids / attention_mask, and labels (B, T) or (B,)."""
    width = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "labels" in examples[0]:
        labels = torch.full((B, width), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, :len(e["labels"])] = torch.tensor(e["labels"], dtype=torch.long)
        batch["labels"] = labels
    else:
        batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    return batch


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """How many targets the batch's summed loss covers: shifted LM tokens, or rows for classification."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return labels.numel()
    return int((labels[:, 1:] != IGNORE).sum())


def batch_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy (fp32). LM: logits (B, T, V) predict labels (B, T) shifted by one; the
    loop divides by the step's target count over all micro-batches and processes."""
    if labels.dim() == 1:  # classification: (B, C) vs (B,)
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE, reduction="sum",
    )


def model_loss_sum(model: torch.nn.Module, owner: torch.nn.Module, batch: dict[str, torch.Tensor],
                   labels: torch.Tensor, chunked: bool) -> torch.Tensor:
    """Summed cross-entropy of ``model(**batch)`` against ``labels``. With ``chunked`` (causal LM only)
    the output head of ``owner`` (the unwrapped model) passes its input through and the loss runs over
    chunks of tokens (:mod:`lorakit.losses`), so the (B, T, V) logits are never materialised."""
    if not chunked or labels.dim() == 1:
        return batch_loss_sum(model(**batch).logits, labels)
    with hidden_states_instead_of_logits(owner) as head:
        hidden = model(**batch).logits  # (B, T, H): the head's input
    return chunked_cross_entropy(hidden[:, :-1], head, labels[:, 1:], ignore_index=IGNORE)
