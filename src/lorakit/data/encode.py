"""Rows → token ids and labels, with the loss on the response only.

* text: the whole text (+ ``</s>``) is predicted.
* instruction / chat: rendered by the tokenizer's chat template (an instruction row is the chat
  ``[user: "instruction input", assistant: output]``); only the assistant turns' tokens keep their
  labels, the rest is ``-100``. A tokenizer without a chat template renders instruction rows as
  ``format_prompt(row) + format_answer(row) + </s>`` (the format of ``lorakit.tasks``).
* completion: ``prompt + completion + </s>`` as plain text (TRL's layout), the loss on the completion.
* classification: the text's ids (a ``text_pair`` is encoded as the tokenizer's second segment)
  and one label id.

``system_prompt`` (``TrainArgs.system_prompt``) decides the system turn of conversations rendered
through a chat template that have none of their own: ``None`` leaves it to the template (many, like
SmolLM2's or Qwen2.5's, then insert their own default system prompt — the same text
``apply_chat_template`` gives at inference without a system message); ``""`` sends an empty system
turn, which replaces such a default; any other text is sent as the system turn. Tool calls
(``tool_calls``, ``tool_call_id``, ``name`` of a message) and a row's ``tools`` list are passed to the
template as they are.

Which tokens are the assistant's is read from character offsets: the template is rendered for the
conversation up to each assistant turn (with the generation prompt) and through it, and the tokens
whose characters fall between the two belong to that turn. So any template works, with or without
``{% generation %}`` markers, as long as rendering a conversation's prefix gives a prefix of the text.

Rows longer than ``max_length`` are cut (counted in ``truncated``); rows left with nothing to predict
are dropped and counted by reason in ``dropped``. With ``packing`` the rows (truncated the same way)
are packed into sequences of ``max_length`` tokens without attention across rows (``packing.py``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from ..errors import ConfigError, DataError
from ..tasks.format import format_answer, format_prompt, to_messages
from .files import RawData
from .packing import pack_rows

IGNORE = -100


@dataclass
class Encoded:
    examples: list[dict[str, Any]]  # {"input_ids": [...], "labels": [...]} or {"input_ids": [...], "label": int}
    kind: str  # "lm" or "cls"
    source: str
    rows: int  # rows read
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    packed: bool = False

    @property
    def max_tokens(self) -> int:
        return max((len(e["input_ids"]) for e in self.examples), default=0)

    def counts(self) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows, "examples": len(self.examples),
                "truncated": self.truncated, "dropped": dict(self.dropped), "packed": self.packed}


def encode(raw: RawData, tokenizer, max_length: int, label2id: dict[str, int] | None = None,
           packing: bool = False, system_prompt: str | None = None) -> Encoded:
    if raw.format == "classification":
        if label2id is None:
            raise ConfigError("classification data needs a label mapping (see label_mapping()).")
        return _encode_cls(raw, tokenizer, max_length, label2id)
    if raw.format == "text":
        texts = [r["text"] for r in raw.rows]
        spans = None  # every token predicted
        add_special = True
    elif raw.format == "completion":
        texts = [r["prompt"] + r["completion"] for r in raw.rows]
        spans = [[(len(r["prompt"]), len(t))] for r, t in zip(raw.rows, texts)]
        add_special = True
    elif raw.format == "chat" or tokenizer.chat_template:
        conversations = [r["messages"] if raw.format == "chat" else _instruction_messages(r) for r in raw.rows]
        conversations = [with_system(c, system_prompt) for c in conversations]
        texts, spans = zip(*(_render_chat(tokenizer, c, raw.source, i + 1, r.get("tools"))
                             for i, (c, r) in enumerate(zip(conversations, raw.rows))))
        add_special = False  # the template writes the special tokens itself
    else:
        prompts = [format_prompt(r) for r in raw.rows]
        texts = [p + format_answer(r) for p, r in zip(prompts, raw.rows)]
        spans = [[(len(p), len(t))] for p, t in zip(prompts, texts)]
        add_special = True
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("lorakit's data pipeline needs a fast tokenizer (a tokenizer.json in the model "
                          "directory) to map labels onto tokens; convert the tokenizer with transformers.")
    enc = tokenizer(list(texts), add_special_tokens=add_special, return_offsets_mapping=True)
    eos = tokenizer.eos_token_id
    out = Encoded([], "lm", raw.source, len(raw.rows), packed=packing)
    dropped: Counter[str] = Counter()
    for i, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        ids = list(ids)
        if spans is None:
            labels = list(ids)
        else:
            labels = [t if _inside(o, spans[i]) else IGNORE for t, o in zip(ids, offsets)]
        # Plain renderings end with </s> so the model learns to stop; the chat template writes its own.
        if add_special and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
            labels.append(eos)
        cut = len(ids) > max_length
        if cut:
            ids, labels = ids[:max_length], labels[:max_length]
        if len(ids) < 2 or all(lab == IGNORE for lab in labels[1:]):
            dropped["no_target_tokens" if spans is not None else "too_short"] += 1
            continue
        out.truncated += cut  # kept but shortened; dropped rows are counted as dropped only
        out.examples.append({"input_ids": ids, "labels": labels})
    out.dropped = dict(dropped)
    if packing:
        out.examples = pack_rows(out.examples, max_length)
    if not out.examples:
        raise DataError(f"{raw.source}: no row is left to train on ({out.dropped}); raise max_length "
                        f"(now {max_length}) or check the rows.")
    return out


def _encode_cls(raw: RawData, tokenizer, max_length: int, label2id: dict[str, int]) -> Encoded:
    texts = [r["text"] for r in raw.rows]
    if any(r.get("text_pair") is not None for r in raw.rows):  # sentence pairs (GLUE's MRPC, RTE, ...)
        enc = tokenizer(texts, [r.get("text_pair") or "" for r in raw.rows], add_special_tokens=True)
    else:
        enc = tokenizer(texts, add_special_tokens=True)
    out = Encoded([], "cls", raw.source, len(raw.rows))
    for i, (ids, row) in enumerate(zip(enc["input_ids"], raw.rows)):
        key = str(row["label"])
        if key not in label2id:
            raise DataError(f"{raw.source} row {i + 1}: label {row['label']!r} is not one of the model's labels "
                            f"{sorted(label2id)} (field 'label'); fix the row or the model's label2id.")
        ids = list(ids)
        if len(ids) > max_length:
            ids = ids[:max_length]
            out.truncated += 1
        if not ids:
            out.dropped["too_short"] = out.dropped.get("too_short", 0) + 1
            continue
        out.examples.append({"input_ids": ids, "label": label2id[key]})
    return out


MAX_CLASSES = 1 << 16  # integer labels are class ids: the head gets max(label) + 1 outputs


def label_mapping(rows: list[dict[str, Any]], config_label2id: dict[str, int] | None = None) -> dict[str, int]:
    """Label (as a string) → class id. Integer labels map to themselves; string labels use the
    model's ``label2id`` when it names them all, else their sorted order."""
    labels = {r["label"] for r in rows}
    if all(isinstance(lab, int) for lab in labels):
        if min(labels) < 0:
            raise DataError(f"classification labels must be ≥ 0, got {min(labels)}; renumber them from 0.")
        if max(labels) >= MAX_CLASSES:  # checked before a head of max+1 classes is allocated
            row = next(i for i, r in enumerate(rows, 1) if r["label"] == max(labels))
            raise DataError(f"row {row}: label {max(labels)} would need a classifier head of {max(labels) + 1:,} "
                            f"classes (limit {MAX_CLASSES:,}); integer labels are class ids — renumber them "
                            "0..K-1, or use string labels.")
        return {str(i): i for i in range(max(labels) + 1)}
    if config_label2id and all(str(lab) in config_label2id for lab in labels):
        return {str(k): int(v) for k, v in config_label2id.items()}
    return {str(lab): i for i, lab in enumerate(sorted(str(lab) for lab in labels))}


# -- chat rendering -----------------------------------------------------------------------------
#: What rendering a chat template can raise on a bad conversation: jinja's own errors (raise_exception()
#: in templates included) and the Python errors of a template indexing or calling into malformed fields.
TEMPLATE_ERRORS = (TemplateError, TypeError, KeyError, IndexError, ValueError, AttributeError)


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """``system_prompt`` as a first system turn, unless it is None (the template's default stays) or the
    conversation brings its own."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _instruction_messages(row: dict[str, Any]) -> list[dict[str, str]]:

    return to_messages(row)


_PASSED = ("tool_calls", "tool_call_id", "name")  # message keys a tool-aware template reads


def _render_chat(tokenizer, messages: list[dict], source: str, n: int,
                 tools: list | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    if not tokenizer.chat_template:
        raise ConfigError(f"{source}: chat rows need a tokenizer with a chat template, and this model's has "
                          "none. Use instruction rows, or a model whose tokenizer_config.json has one.")
    # Keys a file's schema filled with None (datasets unifies the rows' keys) are left out.
    messages = [{"role": m["role"], "content": m.get("content"),
                 **{k: m[k] for k in _PASSED if m.get(k) is not None}} for m in messages]
    extra = {"tools": tools} if tools else {}

    def render(msgs: list[dict], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **extra)

    try:
        full = render(messages, False)
        spans = []
        for j, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = render(messages[:j], True) if j else ""
            through = render(messages[: j + 1], False)
            if not (full.startswith(through) and through.startswith(before)):
                raise ConfigError(
                    f"{source} row {n}: the chat template does not render a conversation's beginning as a "
                    "prefix of the whole, so lorakit cannot find the assistant tokens. Use a template that "
                    "renders incrementally (most do), or instruction rows."
                )
            spans.append((len(before), len(through)))
    except ConfigError:  # a ValueError too: ours, already naming the fix
        raise
    except TEMPLATE_ERRORS as exc:
        raise DataError(f"{source} row {n}: the chat template cannot render this conversation ({exc}) "
                        "(field 'messages'); fix the roles or their order.") from None
    return full, spans


def _inside(offset: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    start, end = offset
    if end <= start:  # tokens with no characters (e.g. added by the tokenizer) are never targets
        return False
    return any(lo <= start < hi for lo, hi in spans)
