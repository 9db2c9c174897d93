"""Fine-tuning: ``train(TrainArgs(...))`` is ``lorakit train`` as a function.

    from lorakit.train import TrainArgs, train
    result = train(TrainArgs(model="path/to/model", data="train.jsonl", r=16, lr=2e-4, max_steps=500))
    result.metrics["loss"]["last"]

Variants extend the loop with hooks (``lorakit.hooks``); the methods are the static table
``lorakit.train.methods.METHODS``.
"""

from .args import TrainArgs
from .hooks import BaseHook, HookContext, TrainHook
from .loop import TrainResult, train
from .methods import METHODS, MethodSetup

__all__ = ["BaseHook", "HookContext", "MethodSetup", "TrainArgs", "TrainHook", "TrainResult", "METHODS", "train"]
