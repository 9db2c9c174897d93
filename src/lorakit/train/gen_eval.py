"""Generation-based scoring of the user's own eval rows: greedy answers compared with the references.

Rows that carry a reference answer are scored; the prompt is rendered exactly as training renders the
text before the answer (``encode.py``), so the model is asked the question in the form it learned:

    instruction   prompt = the user turn through the chat template with the generation prompt (or
                  ``format_prompt(row)`` without a template)   reference = ``output``
    chat          prompt = the conversation before its last assistant turn, generation prompt added
                  reference = that turn's ``content`` (rows whose last assistant turn is a tool call
                  without text are skipped)
    completion    prompt = ``prompt`` (plain text)               reference = ``completion``
    text, classification: no reference — nothing to generate (a classifier has its accuracy).

The first ``eval_generate_rows`` such rows are answered greedily (batched, left-padded; generation
stops at the tokenizer's / the model's end-of-sequence ids or after ``max_new_tokens``) and each
answer is scored with the run's :class:`~lorakit.train.scoring.Scorer`; the eval score is the mean.
``max_new_tokens=None`` means the longest reference (in tokens) + 8: room for the answer and its
end-of-turn tokens, and a bound on a model that rambles.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from .._fs import atomic_write_text
from ..data.encode import TEMPLATE_ERRORS, with_system
from ..data.files import BUILTIN_PREFIX, RawData
from ..errors import ConfigError, DataError
from ..tasks.format import format_prompt, to_messages, user_text
from .scoring import Scorer, load_scorer
from .task_eval import generate_greedy

AUTO_EXTRA_TOKENS = 8  # beyond the longest reference: end-of-turn tokens, a trailing newline
AUTO_MAX_TOKENS = 512  # cap of the automatic bound
_PASSED = ("tool_calls", "tool_call_id", "name")  # message keys a tool-aware template reads (as encode.py)


@dataclass(frozen=True)
class GenPrompt:
    """A prompt as the model sees it: its rendered text, its token ids, and the reference answer."""

    text: str
    ids: list[int]
    reference: str | None = None
    label: str = ""  # what the user wrote (the rendered text may wrap it in a chat template)

    @property
    def shown(self) -> str:
        return self.label or self.text


@dataclass(frozen=True)
class GenScore:
    scorer: str
    score: float  # mean of the rows' scores, in [0, 1]
    n: int
    max_new_tokens: int
    rows: tuple[dict[str, Any], ...]  # prompt, reference, prediction, score for every scored row

    def to_dict(self, examples: int = 3) -> dict[str, Any]:
        return {"scorer": self.scorer, "score": self.score, "n": self.n, "max_new_tokens": self.max_new_tokens,
                "examples": [dict(r) for r in self.rows[:examples]]}


def reference_prompts(raw: RawData, tokenizer, system_prompt: str | None = None, max_length: int = 512,
                      limit: int | None = None) -> list[GenPrompt]:
    """The rows of ``raw`` that have a reference answer, as prompts (at most ``limit``)."""
    out: list[GenPrompt] = []
    for n, row in enumerate(raw.rows, 1):
        if limit is not None and len(out) >= limit:
            break
        item = _prompt_and_reference(raw, row, n, tokenizer, system_prompt)
        if item is None:
            continue
        text, add_special, reference, label = item
        ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
        out.append(GenPrompt(text, list(ids)[-max_length:], reference, label))  # keep the end: it leads to the answer
    return out


def user_prompts(prompts: Sequence[str], tokenizer, chat: bool, system_prompt: str | None = None) -> list[GenPrompt]:
    """Free-text prompts (``sample_prompts``): a user turn through the chat template when ``chat``,
    else raw text continued as it is."""
    out = []
    for p in prompts:
        if chat:
            text = _render(tokenizer, with_system([{"role": "user", "content": p}], system_prompt), None)
            out.append(GenPrompt(text, list(tokenizer(text, add_special_tokens=False)["input_ids"]), None, p))
        else:
            out.append(GenPrompt(p, list(tokenizer(p, add_special_tokens=True)["input_ids"]), None, p))
    return out


def _prompt_and_reference(raw: RawData, row: dict[str, Any], n: int, tokenizer,
                          system_prompt: str | None) -> tuple[str, bool, str, str] | None:
    """(prompt text, whether the tokenizer adds its special tokens, reference, what the user wrote)."""
    if raw.format == "completion":
        return row["prompt"], True, row["completion"], row["prompt"]
    if raw.format == "instruction":
        if not tokenizer.chat_template:
            return format_prompt(row), True, row["output"], user_text(row)
        messages = with_system(to_messages(row)[:1], system_prompt)
        return _render(tokenizer, messages, None, raw.source, n), False, row["output"], user_text(row)
    if raw.format == "chat":
        messages = row["messages"]
        last = max((j for j, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None or not isinstance(messages[last].get("content"), str) or not messages[last]["content"]:
            return None
        head = [{"role": m["role"], "content": m.get("content"), **{k: m[k] for k in _PASSED if m.get(k) is not None}}
                for m in messages[:last]]
        text = _render(tokenizer, with_system(head, system_prompt), row.get("tools"), raw.source, n)
        user = next((m["content"] for m in reversed(head) if m["role"] == "user" and isinstance(m["content"], str)), "")
        return text, False, messages[last]["content"], user
    return None  # text, classification: no reference answer


def _render(tokenizer, messages: list[dict], tools: list | None, source: str = "sample_prompts", n: int = 0) -> str:
    extra = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    except TEMPLATE_ERRORS as exc:
        where = f"{source} row {n}" if n else source
        raise DataError(f"{where}: the chat template cannot render the prompt ({exc}); fix the roles or their "
                        "order.") from None


def stop_ids(tokenizer, model) -> list[int]:
    """End-of-sequence ids of the tokenizer and of the model's generation config (chat models end a turn
    with their own token, e.g. ``<|im_end|>``)."""
    ids = [tokenizer.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]
    return list(dict.fromkeys(i for i in ids if isinstance(i, int)))


def auto_max_new_tokens(tokenizer, references: Sequence[str]) -> int:
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references), default=0)
    return min(AUTO_MAX_TOKENS, longest + AUTO_EXTRA_TOKENS)


class GenerationEval:
    """Scores a model on fixed prompts with references. Built (and the scorer checked on every
    reference) before training; :meth:`run` puts the model in eval mode and restores its mode."""

    def __init__(self, prompts: list[GenPrompt], scorer: Scorer, tokenizer, max_new_tokens: int | None = None,
                 batch_size: int = 16):
        if not prompts:
            raise DataError("generation eval: no eval row has a reference answer (instruction, chat or completion "
                            "rows have one).")
        scorer.check([p.reference for p in prompts])
        self.prompts, self.scorer, self.tokenizer, self.batch_size = prompts, scorer, tokenizer, batch_size
        self.max_new_tokens = max_new_tokens or auto_max_new_tokens(tokenizer, [p.reference for p in prompts])
        self.last: GenScore | None = None  # the latest run's score, every row kept

    def run(self, model, autocast=None) -> GenScore:
        was = model.training
        model.eval()
        try:
            with autocast() if autocast is not None else nullcontext():
                predictions = generate_greedy(model, self.tokenizer, [p.ids for p in self.prompts], self.batch_size,
                                              self.max_new_tokens, stop_ids(self.tokenizer, model))
        finally:
            model.train(was)
        rows = tuple({"prompt": p.text, "reference": p.reference, "prediction": pred,
                      "score": self.scorer(pred, p.reference)} for p, pred in zip(self.prompts, predictions))
        mean = sum(r["score"] for r in rows) / len(rows)
        self.last = GenScore(self.scorer.spec, mean, len(rows), self.max_new_tokens, rows)
        return self.last

    def describe(self) -> str:
        return (f"greedy generation on {len(self.prompts)} eval rows, ≤ {self.max_new_tokens} new tokens; "
                f"{self.scorer.spec}: {self.scorer.description}")


def write_generations(path, score: GenScore, step: int) -> None:
    """Every scored row of ``score`` as JSON lines (``generations.jsonl``: what the model answered)."""
    atomic_write_text(path, "".join(json.dumps({"step": step, **r}, ensure_ascii=False) + "\n" for r in score.rows))


def build_generation_eval(args, raw_eval: RawData | None, tokenizer, task: str) -> GenerationEval | None:
    """The run's generation eval (``TrainArgs`` ``args``), or None when there is nothing to score: a
    classifier, ``eval_generate_rows=0``, no eval rows with references, or a built-in task's eval split
    (its exact match is scored as a task) unless ``metric_for_best=eval_score`` asks for a score.
    The scorer is loaded and checked on every reference here, before any training."""
    scorer = load_scorer(args.scorer)  # a bad module / function fails now, with or without eval rows
    wants = args.metric_for_best == "eval_score" and bool(args.early_stopping_patience or args.save_best)
    why = None
    if task != "causal-lm":
        why = f"a {task} model generates no answers"
    elif not args.eval_generate_rows:
        why = "eval_generate_rows=0"
    elif raw_eval is None:
        why = "there is no eval data (give eval_data or eval_split)"
    elif raw_eval.source.startswith(BUILTIN_PREFIX) and not wants:
        return None  # the task's own exact match is reported under "learning"
    if why is None:
        system = None if args.system_prompt == "auto" else args.system_prompt
        prompts = reference_prompts(raw_eval, tokenizer, system, args.max_length, args.eval_generate_rows)
        if prompts:
            return GenerationEval(prompts, scorer, tokenizer, args.eval_max_new_tokens, args.batch_size)
        why = f"the eval rows ({raw_eval.format}) have no reference answers (instruction, chat or completion rows do)"
    if wants:
        raise ConfigError(f"metric_for_best=eval_score needs a generation score, but {why}; use "
                          "metric_for_best=eval_loss or give eval rows with answers.")
    return None
