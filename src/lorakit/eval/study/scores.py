"""The study's scores: learning on the target task, forgetting of the base's general ability.

All scores are teacher-forced or greedy, on rows the fine-tune never saw:

* ``answer_nll``     mean negative log-likelihood per *answer* token (nats), e.g. of held-out target rows
* ``answer_exact``   fraction of rows whose every answer token (end-of-turn included) is the model's
                     argmax given the reference prefix — exactly the rows that greedy decoding answers
                     token for token with the reference, at the cost of one forward pass
* ``exact_match``    fraction of generated answers equal to the reference (case and spacing ignored)
* ``perplexity``     exp(mean next-token NLL) over blocks of real text (every token after the first)
* ``agreement``      with the base's own greedy answers to general prompts, teacher-forced: the
                     fraction of answer positions where the model's argmax is the base's argmax, and
                     the mean per-token KL(p_base ‖ p_model) (nats), as in ``lorakit.train.probe``

Logits are computed only where they are scored (the output head runs on the selected hidden states,
``lorakit.losses.hidden_states_instead_of_logits``): SmolLM2's 49,152-word head would otherwise
dominate the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...data.batches import collate
from ...data.encode import IGNORE
from ...losses import hidden_states_instead_of_logits


def _batches(examples: list[dict], pad_id: int, batch_size: int):
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i:i + batch_size], pad_id)


def selected_logits(model, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """(n, V) fp32 logits predicting token t+1 at the n positions t where ``keep`` (B, T-1) is true."""
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
    with hidden_states_instead_of_logits(model) as head:
        hidden = model(**inputs).logits[:, :-1]  # (B, T-1, H): the head's inputs
    return head(hidden[keep.to(device)]).float()  # (n, V)


@torch.no_grad()
def answer_scores(model, examples: list[dict], pad_id: int, batch_size: int = 16) -> tuple[float, float]:
    """(mean NLL per labelled token, fraction of rows whose labelled tokens are all the argmax) of encoded
    ``examples`` ({"input_ids", "labels"}; IGNORE = unscored), from one forward pass per batch."""
    total, count, hits = 0.0, 0, 0
    for b in _batches(examples, pad_id, batch_size):
        targets = b["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
        keep = targets != IGNORE
        logits = selected_logits(model, b, keep).cpu()  # (n, V), rows in row-major order of keep
        total += float(F.cross_entropy(logits, targets[keep], reduction="sum"))
        count += int(keep.sum())
        wrong = torch.zeros_like(keep)
        wrong[keep] = logits.argmax(-1) != targets[keep]
        hits += int((~wrong.any(1)).sum())
    return total / max(count, 1), hits / len(examples)


def answer_nll(model, examples: list[dict], pad_id: int, batch_size: int = 16) -> float:
    """Mean NLL per labelled token of encoded ``examples``."""
    return answer_scores(model, examples, pad_id, batch_size)[0]


def answer_exact(model, examples: list[dict], pad_id: int, batch_size: int = 16) -> float:
    """Fraction of ``examples`` whose labelled tokens are all the argmax at the position before them."""
    return answer_scores(model, examples, pad_id, batch_size)[1]


@torch.no_grad()
def perplexity(model, blocks: list[list[int]], batch_size: int = 8) -> float:
    """exp(mean NLL) of every token but the first of each block of token ids (equal-length blocks)."""
    examples = [{"input_ids": b, "labels": b} for b in blocks]
    return float(torch.exp(torch.tensor(answer_nll(model, examples, 0, batch_size))))


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference, ignoring case and runs of whitespace."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return sum(normalise(p) == normalise(r) for p, r in zip(predictions, references)) / len(references)


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, end_ids: list[int],
                   batch_size: int = 16) -> list[str]:
    """Greedy continuations of already-rendered ``prompts`` (left-padded), decoded without special tokens."""
    side, outs = tokenizer.padding_side, []
    tokenizer.padding_side = "left"
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end_ids,
                                 pad_token_id=tokenizer.pad_token_id)
            outs += [t.strip() for t in tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:],
                                                               skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was)
    return outs


@dataclass
class BaseReference:
    """The base model's answer distributions at the answer positions of ``examples`` (one batch each)."""

    batches: list[dict[str, torch.Tensor]]
    keeps: list[torch.Tensor]  # (B, T-1) bool per batch
    logprobs: list[torch.Tensor]  # (n, V) log p_base per batch


@torch.no_grad()
def base_reference(base, examples: list[dict], pad_id: int, batch_size: int = 8) -> BaseReference:
    ref = BaseReference([], [], [])
    for b in _batches(examples, pad_id, batch_size):
        keep = b["labels"][:, 1:] != IGNORE
        ref.batches.append(b)
        ref.keeps.append(keep)
        ref.logprobs.append(F.log_softmax(selected_logits(base, b, keep), -1).cpu())
    return ref


@torch.no_grad()
def agreement(model, ref: BaseReference) -> tuple[float, float]:
    """(token agreement, mean KL(p_base ‖ p_model)) over every answer position of the reference."""
    agree, kl, n = 0.0, 0.0, 0
    for b, keep, base in zip(ref.batches, ref.keeps, ref.logprobs):
        cur = F.log_softmax(selected_logits(model, b, keep), -1).cpu()
        agree += float((cur.argmax(-1) == base.argmax(-1)).sum())
        kl += float((base.exp() * (base - cur)).sum())
        n += base.shape[0]
    return agree / n, kl / n
