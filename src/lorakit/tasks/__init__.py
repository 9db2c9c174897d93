"""Built-in synthetic tasks and the embedded base model they go with.

>>> from lorakit import tasks
>>> t = tasks.get("rev")
>>> row = t.examples(1, seed=0, split="eval")[0]
>>> tasks.format_prompt(row), tasks.format_answer(row)
('rev ojj=', 'jjo\\n')
>>> t.score("jjo", row)
True

Base tasks (``names("base")``) are the ones the embedded model was pretrained on; new tasks
(``names("new")``) are what fine-tuning teaches it. ``DEFAULT_TASK`` is what ``lorakit train`` with no
arguments fine-tunes on.
"""

from .builtin import BUILTIN_TASKS, DEFAULT_TASK
from .embedded import embedded_manifest, embedded_model_dir, load_embedded
from .format import (
    PROMPT_FORMAT_VERSION,
    format_answer,
    format_prompt,
    parse_answer,
    to_messages,
    user_text,
)
from .io import write_jsonl
from .registry import get, names
from .task import Split, Task, split_of
from .tokenizer import build_tokenizer

__all__ = [
    "BUILTIN_TASKS",
    "DEFAULT_TASK",
    "PROMPT_FORMAT_VERSION",
    "Split",
    "Task",
    "build_tokenizer",
    "embedded_manifest",
    "embedded_model_dir",
    "format_answer",
    "format_prompt",
    "get",
    "load_embedded",
    "names",
    "parse_answer",
    "split_of",
    "to_messages",
    "user_text",
    "write_jsonl",
]
