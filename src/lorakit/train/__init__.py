"""Fine-tuning: ``train(TrainArgs(...))`` is ``lorakit train`` as a function.

    from lorakit.train import TrainArgs, train
    result = train(TrainArgs(model="path/to/model", data="train.jsonl", r=16, lr=2e-4, max_steps=500))
    result.metrics["loss"]["last"]

Variants extend the loop with hooks (``lorakit.train.hooks``) and register methods
(``lorakit.train.methods.register``).
"""

from .args import TrainArgs
from .hooks import BaseHook, HookContext, TrainHook
from .loop import TrainResult, train
from .methods import MethodSetup, register

__all__ = ["BaseHook", "HookContext", "MethodSetup", "TrainArgs", "TrainHook", "TrainResult", "register", "train"]
