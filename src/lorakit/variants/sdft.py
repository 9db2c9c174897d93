"""Self-distillation fine-tuning, SDFT (Yang et al., ACL 2024, arXiv 2402.13669) — a data transform.

Fine-tuning on responses written by someone else pulls the model away from its own output
distribution, and that gap is what makes it forget (§2 of the paper). SDFT closes the gap before
training: the *base model itself* rewrites every training response, seeing the original as a
reference answer (§3, Fig. 2), and the rewrite replaces the original when it is still correct:

    row ──template(row)──► base model ──rewrite──► mentions "the reference answer"? ─yes─► keep original
                                                    │ no
                                                    ▼
                                          check(rewrite, row) passes? ──no──► keep original
                                                    │ yes
                                                    ▼
                                          replace the response by the rewrite

Then ordinary (LoRA) fine-tuning runs on the distilled rows.

* Templates: ``"alpaca"`` is the paper's distillation template for instruction-following models.
  ``"embedded"`` fits lorakit's character-level embedded model, which has never seen English
  instructions: it shows the row once *with* its reference answer, then asks the same prompt
  again — ``"rev abc=cba\\nrev abc="`` — so the reference sits in context as a worked example.
* Check: a pluggable ``check(rewrite, row) -> bool``; by default the built-in task whose
  instruction word the row carries scores it (``Task.score``, exact match of the answer line);
  rows of unknown tasks accept every rewrite, as the authors' code does for general instruction data.
* Rejection: rewrites that talk about the template itself ("reference answer", "your response",
  …, the authors' ban list) are never used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .._fs import atomic_write_json, atomic_write_text
from ..errors import ConfigError, DataError
from ..tasks import BUILTIN_TASKS
from ..tasks.format import format_prompt, parse_answer, to_messages, user_text
from ..validate import check_int

# The authors' ban list (eval/gen_distilled_data.py in sail-sg/sdft), matched case-insensitively.
REFERENCE_PHRASES = ("reference answer", "your response", "my response", "your own response", "now it's your turn")

Generator = Callable[[list[str]], list[str]]  # prompts -> continuations (the text after each prompt)
Check = Callable[[str, Mapping[str, Any]], bool]  # (rewrite, original row) -> keep the rewrite?


@dataclass(frozen=True)
class DistillTemplate:
    """How the base model is asked to rewrite one row.

    ``text`` may use ``{prompt}`` (the embedded format's ``"instruction input="``), ``{user}``
    (``"instruction input"``) and ``{reference}`` (the original response). ``answer`` says what of the
    continuation is the rewrite: its first line (``"line"``) or all of it, stripped (``"full"``).
    """

    name: str
    text: str
    answer: Literal["line", "full"] = "full"

    def render(self, row: Mapping[str, Any]) -> str:
        return self.text.format(prompt=format_prompt(row), user=user_text(row), reference=row["output"])

    def parse(self, continuation: str) -> str:
        return parse_answer(continuation) if self.answer == "line" else continuation.strip()


TEMPLATES: dict[str, DistillTemplate] = {
    "embedded": DistillTemplate("embedded", "{prompt}{reference}\n{prompt}", answer="line"),
    # The paper's Alpaca-style distillation template (§3, Fig. 2; "alpaca_distill_using" in their code).
    "alpaca": DistillTemplate(
        "alpaca",
        "Below are an instruction that describes a task along with a reference answer. Using the "
        "reference answer as a guide, write your own response.\n\n### Instruction:\n{user}\n\n"
        "### Reference Answer:\n{reference}\n\n### Response:\n",
        answer="full",
    ),
}


def get_template(template: str | DistillTemplate) -> DistillTemplate:
    if isinstance(template, DistillTemplate):
        return template
    if template not in TEMPLATES:
        raise ConfigError(f"unknown distillation template {template!r}; use one of {sorted(TEMPLATES)} "
                          "or pass a DistillTemplate.")
    return TEMPLATES[template]


def mentions_reference(text: str) -> bool:
    """True when a rewrite talks about the template (the reference answer, "your response", ...)."""
    low = text.lower()
    return any(p in low for p in REFERENCE_PHRASES) or low.startswith("your turn")


def builtin_check(rewrite: str, row: Mapping[str, Any]) -> bool:
    """The default check: the built-in task with the row's instruction word scores the rewrite
    (``Task.score``); a row of no built-in task accepts any non-empty rewrite."""

    for task in BUILTIN_TASKS:
        if task.instruction == row.get("instruction"):
            return task.score(rewrite, row)
    return bool(rewrite.strip())


# -- the keep / replace decision --------------------------------------------------------------------
@dataclass
class DistillCounts:
    rows: int = 0
    replaced: int = 0  # response replaced by the model's rewrite
    kept: int = 0  # original response kept (= the three reasons below)
    rejected_reference: int = 0  # rewrite talked about the reference answer / the template
    failed_check: int = 0  # rewrite did not pass the check
    empty: int = 0  # the model wrote nothing

    def __str__(self) -> str:
        return (f"{self.rows} rows: {self.replaced} replaced by the model's rewrite, {self.kept} kept "
                f"(failed check {self.failed_check}, mentioned the reference {self.rejected_reference}, "
                f"empty {self.empty})")


def decide(rewrite: str, row: Mapping[str, Any], check: Check) -> str:
    """``"replaced"``, ``"rejected_reference"``, ``"failed_check"`` or ``"empty"`` for one rewrite."""
    if not rewrite.strip():
        return "empty"
    if mentions_reference(rewrite):
        return "rejected_reference"
    return "replaced" if check(rewrite, row) else "failed_check"


def distill_rows(rows: Sequence[Mapping[str, Any]], generate: Generator,
                 template: str | DistillTemplate = "embedded", check: Check | None = None,
                 batch_size: int = 64) -> tuple[list[dict[str, Any]], DistillCounts]:
    """Distil ``{"instruction", "input", "output"}`` rows: ``(new rows, counts)``; inputs unchanged."""
    template = get_template(template)
    check = check or builtin_check
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1.")
    counts = DistillCounts(rows=len(rows))
    out: list[dict[str, Any]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        continuations = generate([template.render(r) for r in chunk])
        if len(continuations) != len(chunk):
            raise ConfigError(f"the generator returned {len(continuations)} texts for {len(chunk)} prompts; "
                              "it must return one continuation per prompt.")
        for row, cont in zip(chunk, continuations):
            rewrite = template.parse(cont)
            verdict = decide(rewrite, row, check)
            new = dict(row)
            if verdict == "replaced":
                new["output"] = rewrite
                counts.replaced += 1
            else:
                counts.kept += 1
                setattr(counts, verdict, getattr(counts, verdict) + 1)
            out.append(new)
    return out, counts


# -- files ------------------------------------------------------------------------------------------
def read_rows(path: str | os.PathLike) -> tuple[list[dict[str, Any]], str]:
    """Rows of a JSONL file as instruction rows, and the schema it used (``instruction``/``messages``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass a JSONL file of {{instruction, input, output}} rows.")
    rows, schemas = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not valid JSON ({exc.msg}); each line must be one JSON object.") from None
        row, schema = _as_instruction_row(obj, f"{path}:{n}")
        rows.append(row)
        schemas.add(schema)
    if not rows:
        raise DataError(f"{path}: the file has no rows.")
    if len(schemas) > 1:
        raise DataError(f"{path}: mixes instruction rows and messages rows; use one schema per file.")
    return rows, schemas.pop()


def _as_instruction_row(obj: Any, where: str) -> tuple[dict[str, Any], str]:
    fix = ('use {"instruction": ..., "input": ..., "output": ...} or '
           '{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}')
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a row must be a JSON object; {fix}.")
    if "messages" in obj:
        msgs = obj["messages"]
        ok = (isinstance(msgs, list) and len(msgs) == 2 and all(isinstance(m, dict) for m in msgs)
              and [m.get("role") for m in msgs] == ["user", "assistant"]
              and all(isinstance(m.get("content"), str) for m in msgs))
        if not ok:
            raise DataError(f"{where}: distillation reads single-turn chats (one user, then one assistant "
                            f"message, string contents); {fix}.")
        instruction, _, inp = msgs[0]["content"].partition(" ")
        return {"instruction": instruction, "input": inp, "output": msgs[1]["content"]}, "messages"
    missing = [k for k in ("instruction", "output") if not isinstance(obj.get(k), str)]
    if missing or not isinstance(obj.get("input", ""), str):
        bad = missing or ["input"]
        raise DataError(f"{where}: field(s) {', '.join(bad)} missing or not a string; {fix}.")
    return dict(obj), "instruction"


def write_rows(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], schema: str = "instruction") -> Path:

    lines = [json.dumps({"messages": to_messages(r)} if schema == "messages" else dict(r), ensure_ascii=False)
             for r in rows]
    path = Path(path)
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


def hf_generator(model, tokenizer, max_new_tokens: int = 32, stop: Sequence[str] = ("\n",)) -> Generator:
    """Greedy, left-padded batched generation with a transformers causal LM; stops at ``stop`` or EOS."""
    check_int("max_new_tokens", max_new_tokens, minimum=1)  # transformers' own error is a raw ValueError
    stop_ids = [tokenizer.convert_tokens_to_ids(s) for s in stop]
    stop_ids = [i for i in stop_ids if i is not None and i != tokenizer.unk_token_id]
    if tokenizer.eos_token_id is not None:
        stop_ids.append(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.inference_mode()
    def generate(prompts: list[str]) -> list[str]:
        enc = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for i, e in enumerate(enc):  # left padding: every row continues at the same column
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                 pad_token_id=pad)
        finally:
            model.train(was_training)
        return [tokenizer.decode(o[width:].tolist(), skip_special_tokens=True) for o in out]

    return generate


def distill_file(model, tokenizer, data: str | os.PathLike, out: str | os.PathLike,
                 template: str | DistillTemplate = "embedded", check: Check | None = None,
                 batch_size: int = 64, max_new_tokens: int = 32) -> DistillCounts:
    """``lorakit distill-data``: read ``data`` (JSONL), distil it with ``model``, write ``out`` in the same
    schema and ``<out>.counts.json``; returns the counts."""
    rows, schema = read_rows(data)
    generate = hf_generator(model, tokenizer, max_new_tokens=max_new_tokens,
                            stop=("\n",) if get_template(template).answer == "line" else ())
    new_rows, counts = distill_rows(rows, generate, template, check, batch_size)
    out = Path(out)
    write_rows(out, new_rows, schema)
    atomic_write_json(counts_path(out), {**asdict(counts), "template": get_template(template).name,
                                         "source": str(data)})
    return counts


def counts_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".counts.json")
