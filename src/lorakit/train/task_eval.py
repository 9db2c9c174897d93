"""Score a causal LM on built-in tasks by batched greedy generation and exact match.

Any model with the Hugging Face causal-LM interface works — the plain base model, a PEFT model, or
the same model with lorakit's LoRA layers injected — since only ``model.generate`` is called.
Prompts are left-padded so every row's answer starts at the same column; ``generate`` derives the
position ids from the attention mask, so padding does not shift positions. Generation stops at the
answer's newline or at ``</s>``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..tasks import Split, Task, format_answer, format_prompt, get, parse_answer

DEFAULT_EVAL_SEED = 1234


@dataclass(frozen=True)
class TaskExample:
    """One scored row: what was asked, what was expected, what the model answered."""

    prompt: str
    target: str
    prediction: str
    correct: bool


@dataclass(frozen=True)
class TaskScore:
    """Exact-match accuracy of one task over ``n`` rows, with every row kept for inspection."""

    task: str
    accuracy: float
    n: int
    correct: int
    examples: tuple[TaskExample, ...]

    def __str__(self) -> str:
        return f"{self.task}: {100 * self.accuracy:.1f}% ({self.correct}/{self.n})"


def _stop_ids(tokenizer) -> list[int]:
    # The answer ends with "\n"; a model fine-tuned on chat data may emit </s> right after it or
    # instead of it. Either ends the answer.
    ids = [tokenizer.convert_tokens_to_ids("\n")]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def _generate(model, tokenizer, prompts: Sequence[str], batch_size: int, max_new_tokens: int) -> list[str]:
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    return generate_greedy(model, tokenizer, encoded, batch_size, max_new_tokens, _stop_ids(tokenizer))


@torch.inference_mode()
def generate_greedy(model, tokenizer, encoded: Sequence[Sequence[int]], batch_size: int, max_new_tokens: int,
                    stop: Sequence[int]) -> list[str]:
    """Greedy continuations of the token-id prompts ``encoded`` (decoded, special tokens skipped), in
    batches of ``batch_size`` rows; generation stops at any id of ``stop`` or after ``max_new_tokens``."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    # Batch rows of similar length together: less padding, fewer wasted positions.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        # Left padding: (B, width), real tokens flush right so generation continues every row at once.
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids = encoded[i]
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=list(stop) or None,
            pad_token_id=pad_id,
        )
        # (B, width + new) -> the new tokens only; rows that stopped early are padded after the stop.
        for row, i in enumerate(idx):
            outputs[i] = tokenizer.decode(out[row, width:].tolist(), skip_special_tokens=True)
    return outputs


def evaluate_task(
    model,
    tokenizer,
    task: str | Task,
    n: int = 200,
    seed: int = DEFAULT_EVAL_SEED,
    split: Split = "eval",
    batch_size: int = 100,
    max_new_tokens: int | None = None,
) -> TaskScore:
    """Exact-match accuracy of ``model`` on ``n`` rows of ``task`` (greedy decoding).

    ``max_new_tokens`` defaults to the longest target answer (in tokens, newline included) plus 2:
    enough room to write any correct answer and its newline, little to waste on rambling. The model
    is put in eval mode for the call and its training mode restored after.
    """
    task = get(task)
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    rows = task.examples(n, seed=seed, split=split)
    if not rows:
        return TaskScore(task.name, 0.0, 0, 0, ())
    prompts = [format_prompt(r) for r in rows]
    if max_new_tokens is None:
        answers = tokenizer([format_answer(r) for r in rows], add_special_tokens=False)["input_ids"]
        max_new_tokens = max(len(a) for a in answers) + 2
    was_training = model.training
    model.eval()
    try:
        generated = _generate(model, tokenizer, prompts, batch_size, max_new_tokens)
    finally:
        model.train(was_training)
    examples = tuple(
        TaskExample(p, r["output"], parse_answer(g), task.score(g, r))
        for p, r, g in zip(prompts, rows, generated)
    )
    correct = sum(e.correct for e in examples)
    return TaskScore(task.name, correct / len(rows), len(rows), correct, examples)


def evaluate_tasks(model, tokenizer, names: Iterable[str | Task], **kwargs) -> dict[str, TaskScore]:
    """:func:`evaluate_task` for each task; ``kwargs`` (n, seed, split, ...) apply to all of them."""
    scores = {}
    for name in names:
        score = evaluate_task(model, tokenizer, name, **kwargs)
        scores[score.task] = score
    return scores
