"""The built-in-task scorer lives in ``lorakit.train.task_eval`` (the training loop scores tasks with it,
and train sits below eval); re-exported here."""

from ..train.task_eval import TaskExample, TaskScore, evaluate_task, evaluate_tasks

__all__ = ["TaskExample", "TaskScore", "evaluate_task", "evaluate_tasks"]
