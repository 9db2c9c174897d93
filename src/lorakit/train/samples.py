"""Sample generations while training: a few fixed prompts answered every ``sample_every`` steps.

What the model writes is the feedback a loss curve cannot give. Every N steps the loop calls
:meth:`Sampler.run`: each prompt is answered greedily (``sample_max_new_tokens``), and the answers go to

* ``OUTPUT_DIR/samples.jsonl`` — one line per prompt: ``{"step", "prompt", "output"}``;
* the run's text output (printed above the progress bar);
* TensorBoard's text tab (``samples``), when TensorBoard logging is on.

Prompts (``sample_prompts``): a list, or a text file with one prompt a line; they are sent as a user
turn through the chat template when the training rows are instruction/chat rows and the tokenizer has
a template, else as raw text. By default: the first 3 prompts of the eval rows with a reference answer,
else of the training rows (a text row's first 40 characters).

Sampling leaves training exactly as it was: the model goes back to its training mode, and the RNG
state of torch (CPU and CUDA) is forked around it, so dropout masks and the losses are the same with
and without sampling (tested).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from .._fs import atomic_write_text
from ..data.files import RawData
from ..errors import ConfigError
from .gen_eval import GenPrompt, reference_prompts, stop_ids, user_prompts
from .task_eval import generate_greedy

SAMPLES_FILE = "samples.jsonl"
DEFAULT_PROMPTS = 3
TEXT_PREFIX_CHARS = 40
_PROMPT_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".md")


def read_sample_prompts(spec: list[str] | str) -> list[str]:
    """``sample_prompts``: a list of prompts, or a string naming a text file (one prompt a line; blank lines
    skipped); a string that is no file and does not look like a file name is one prompt."""
    if isinstance(spec, str):
        path = Path(spec)
        if path.is_file():
            prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not prompts:
                raise ConfigError(f"sample_prompts={spec!r}: the file holds no prompt; write one prompt a line.")
            return prompts
        if path.suffix in _PROMPT_FILE_SUFFIXES:
            raise ConfigError(f"sample_prompts={spec!r}: no such file; give a text file with one prompt a line, "
                              "or a list of prompts (YAML list, or comma-separated).")
        return [spec]
    if not isinstance(spec, (list, tuple)) or not spec or not all(isinstance(p, str) and p.strip() for p in spec):
        raise ConfigError(f"sample_prompts={spec!r}: give a non-empty list of non-empty prompts, or a file of them.")
    return list(spec)


def default_prompts(raw_eval: RawData | None, raw_train: RawData, tokenizer, system_prompt: str | None,
                    max_length: int) -> list[GenPrompt]:
    for raw in (raw_eval, raw_train):
        if raw is not None:
            prompts = reference_prompts(raw, tokenizer, system_prompt, max_length, DEFAULT_PROMPTS)
            if prompts:
                return prompts
    if raw_train.format == "text":
        heads = [r["text"][:TEXT_PREFIX_CHARS] for r in raw_train.rows[:DEFAULT_PROMPTS] if r["text"].strip()]
        return user_prompts(heads, tokenizer, chat=False)
    return []


class Sampler:
    def __init__(self, prompts: list[GenPrompt], every: int, max_new_tokens: int, tokenizer, output_dir: Path,
                 start_step: int = 0):
        if not prompts:
            raise ConfigError("sample_every: no prompt to sample; give sample_prompts (a list or a file).")
        self.prompts, self.every, self.max_new_tokens, self.tokenizer = prompts, every, max_new_tokens, tokenizer
        self.path = output_dir / SAMPLES_FILE
        _keep_until(self.path, start_step)  # a resumed run redoes the steps after its checkpoint

    def due(self, step: int) -> bool:
        """After optimizer step ``step`` (1-based)."""
        return step % self.every == 0

    def run(self, model, step: int, autocast=None) -> list[dict[str, Any]]:
        was = model.training
        model.eval()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            # Greedy decoding draws no random numbers today; the fork keeps it so whatever generate does.
            with torch.random.fork_rng(devices=devices), (autocast() if autocast is not None else nullcontext()):
                outputs = generate_greedy(model, self.tokenizer, [p.ids for p in self.prompts], len(self.prompts),
                                          self.max_new_tokens, stop_ids(self.tokenizer, model))
        finally:
            model.train(was)
        return [{"step": step, "prompt": p.shown, "output": o} for p, o in zip(self.prompts, outputs)]

    def write(self, rows: list[dict[str, Any]], log=None, echo=print) -> None:
        """Append to samples.jsonl, print, and add to TensorBoard (``log`` is the run's ``StepLog``)."""
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        step = rows[0]["step"] if rows else 0
        echo("\n".join([f"samples at step {step}:"]
                       + [f"  [{i}] {_one_line(r['prompt'])} → {_one_line(r['output'])}" for i, r in enumerate(rows, 1)]))
        if log is not None:
            log.text("samples", "\n\n".join(f"**{r['prompt']}**\n\n{r['output']}" for r in rows), step)


def _keep_until(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _step_of(line: str) -> float:
    """A line's step; a line cut short by a kill mid-append (or blank) counts as after every step."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return float("inf")
    return row.get("step", float("inf")) if isinstance(row, dict) else float("inf")


def _one_line(text: str, n: int = 200) -> str:
    text = text.replace("\n", "⏎")
    return text if len(text) <= n else text[: n - 1] + "…"


def build_sampler(args, raw_train: RawData, raw_eval: RawData | None, tokenizer, task: str, output_dir: Path,
                  start_step: int) -> Sampler | None:
    """The run's sampler (``TrainArgs`` ``args``), or None with ``sample_every=0``."""
    if not args.sample_every:
        return None
    if task != "causal-lm":
        raise ConfigError(f"sample_every={args.sample_every}: a {task} model generates no text; set sample_every=0.")
    system = None if args.system_prompt == "auto" else args.system_prompt
    if args.sample_prompts is not None:
        chat = bool(tokenizer.chat_template) and raw_train.format in ("instruction", "chat")
        prompts = user_prompts(read_sample_prompts(args.sample_prompts), tokenizer, chat, system)
    else:
        prompts = default_prompts(raw_eval, raw_train, tokenizer, system, args.max_length)
    return Sampler(prompts, args.sample_every, args.sample_max_new_tokens, tokenizer, output_dir, start_step)
