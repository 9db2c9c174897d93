"""How many parameters train, out of how many."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class TrainableSummary:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> TrainableSummary:
    """Count trainable and total parameters (shared tensors counted once; quantized buffers by element)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    for b in model.buffers():
        # Packed low-bit weights live in buffers; count the parameters they stand for.
        total += int(getattr(b, "_lorakit_params", 0))
    return TrainableSummary(trainable, total)


def print_trainable_parameters(model: nn.Module) -> TrainableSummary:
    summary = trainable_parameters(model)
    print(summary)
    return summary
