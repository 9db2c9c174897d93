"""The one prompt/answer format shared by pretraining, fine-tuning and evaluation.

A row ``{"instruction": "rev", "input": "abc", "output": "cba"}`` becomes the prompt ``"rev abc="``
and the answer ``"cba\\n"``: the model reads the prompt and writes the answer; the newline ends it.
The format is compact on purpose — the embedded model reads characters, so every character of
boilerplate costs a position (its context is 128) and some compute.

The chat template saved with the embedded tokenizer renders :func:`to_messages` of a row as exactly
``bos + format_prompt(row) + format_answer(row) + eos``, so instruction-format and chat-format
data train the same model the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import DataError

# Bump when the rendering below changes: a checkpoint trained on one version answers prompts of that
# version only. Stored in the checkpoint's ``lorakit_tasks.json``.
PROMPT_FORMAT_VERSION = 1
PROMPT_END = "="  # the last character of every prompt: "now answer"
ANSWER_END = "\n"  # the last character of every answer; generation stops on it


def _field(row: Mapping, key: str) -> str:
    if not isinstance(row, Mapping):
        raise DataError(f"a task row must be a dict with instruction/input/output, got {type(row).__name__}")
    if key not in row:
        raise DataError(f"task row {dict(row)!r} has no {key!r} field; rows need instruction, input, output")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(
            f"field {key!r} of task row {dict(row)!r} must be a string, got {type(value).__name__}"
        )
    return value


def user_text(row: Mapping) -> str:
    """The question part of a row: ``"{instruction} {input}"``, or just the instruction if no input."""
    instruction = _field(row, "instruction")
    inp = row.get("input", "") or ""
    if not isinstance(inp, str):
        raise DataError(f"field 'input' of task row {dict(row)!r} must be a string, got {type(inp).__name__}")
    return f"{instruction} {inp}" if inp else instruction


def format_prompt(row: Mapping) -> str:
    """The prompt the model continues: ``"{instruction} {input}="`` (e.g. ``"rev abc="``)."""
    return user_text(row) + PROMPT_END


def format_answer(row: Mapping) -> str:
    """The text the model must produce after the prompt: ``"{output}\\n"`` (e.g. ``"cba\\n"``)."""
    return _field(row, "output") + ANSWER_END


def parse_answer(generated: str) -> str:
    """The answer inside generated text: everything before the first newline, stripped."""
    return generated.split(ANSWER_END, 1)[0].strip()


def to_messages(row: Mapping) -> list[dict[str, str]]:
    """The row as chat ``messages`` (one user turn, one assistant turn) for chat-format data."""
    return [
        {"role": "user", "content": user_text(row)},
        {"role": "assistant", "content": _field(row, "output")},
    ]
