"""Loss / perplexity / accuracy live in ``lorakit.train.metrics`` (the training loop evaluates with them,
and train sits below eval); re-exported here."""

from ..train.metrics import LossMetrics, evaluate_loss

__all__ = ["LossMetrics", "evaluate_loss"]
