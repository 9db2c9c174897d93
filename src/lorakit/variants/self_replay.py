"""Self-replay: the base model's *own* prompts and answers, mixed into training against forgetting.

Fine-tuning on a narrow set of facts pulls a chat model away from everything else it did (on
SmolLM2-135M, 80 LoRA steps on 30 short facts made it answer "What is the capital of France?" with
one of the facts). Replaying rows of the tasks to keep is the classic guard, but a user rarely has
such rows. This module writes them with the base model itself, before training:

1. **Prompts (Magpie, Xu et al. 2024, arXiv 2406.08464, §2.1):** an aligned chat model, given only
   its chat template's *user-turn prefix* (``<|im_start|>user\\n``: the text before the user's
   content), samples a plausible user query, ending at the template's end-of-turn marker. Nothing
   but the model and its template is needed.
2. **Answers (self-distillation, in the spirit of SDFT, Yang et al. 2024, §3):** the base model
   answers each prompt greedily. Training on these rows pulls the model toward its own outputs on
   general prompts while the user's rows teach the new skill.

The same prompt/answer pairs are the forgetting probe's fixed set (``lorakit.train.probe``): the KL
from the base model's answer distribution, measured during training, needs no extra data either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, DataError

_MARK = "\u2063LORAKIT\u2063"  # a string no template contains, to find where the user's content goes


@dataclass(frozen=True)
class ChatFrame:
    """The text a chat template puts before and after a user turn's content."""

    user_prefix: str  # e.g. "<|im_start|>system\n...<|im_end|>\n<|im_start|>user\n"
    end_of_turn: str  # e.g. "<|im_end|>"


def chat_frame(tokenizer) -> ChatFrame:
    """The user-turn prefix and end-of-turn marker of ``tokenizer``'s chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"self-replay needs a chat model: the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no "
            "chat template. Use replay_data=FILE with rows of the tasks to keep instead."
        )
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False)
    before, _, after = text.partition(_MARK)
    end = after.strip().split()[0] if after.strip() else (tokenizer.eos_token or "")
    if not end:
        raise ConfigError("self-replay: the chat template ends a user turn with nothing that marks its end; "
                          "use replay_data=FILE instead.")
    return ChatFrame(before, end)


def _end_ids(tokenizer, frame: ChatFrame) -> list[int]:
    ids = tokenizer.encode(frame.end_of_turn, add_special_tokens=False)
    out = {ids[0]} if len(ids) == 1 else set()
    if tokenizer.eos_token_id is not None:
        out.add(tokenizer.eos_token_id)
    return sorted(out)


@torch.no_grad()
def _generate(model, tokenizer, texts: list[str], max_new_tokens: int, sample: bool, end_ids: list[int],
              batch_size: int) -> list[str]:
    """Continuations of ``texts`` (left-padded batches), decoded without special tokens."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    outs: list[str] = []
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
            kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=end_ids,
                                      pad_token_id=tokenizer.pad_token_id, do_sample=sample)
            if sample:
                kw.update(temperature=1.0, top_p=0.95, top_k=0)
            gen = model.generate(**enc, **kw)[:, enc["input_ids"].shape[1]:]
            outs += tokenizer.batch_decode(gen, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outs


def magpie_prompts(model, tokenizer, n: int, *, seed: int = 0, max_new_tokens: int = 48,
                   batch_size: int = 8, max_tries: int = 3) -> list[str]:
    """``n`` distinct user prompts the model writes itself from its user-turn prefix (Magpie §2.1)."""
    if n <= 0:
        raise ConfigError(f"self-replay with a budget of {n} prompts: ask for at least 1 "
                          "(self_replay_prompts=32, say), or turn replay off (replay=0).")
    frame = chat_frame(tokenizer)
    end_ids = _end_ids(tokenizer, frame)
    devices = {p.device for p in model.parameters()}
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    prompts: list[str] = []
    try:
        for _ in range(max_tries):
            need = n - len(prompts)
            for text in _generate(model, tokenizer, [frame.user_prefix] * need, max_new_tokens, True, end_ids,
                                  batch_size):
                text = text.split(frame.end_of_turn)[0].strip()
                if len(text) >= 8 and text not in prompts:  # a real query, not a fragment or a repeat
                    prompts.append(text)
            if len(prompts) >= n:
                break
    finally:
        torch.random.set_rng_state(state)  # the run's own randomness is not disturbed
    if not prompts:
        raise DataError(f"self-replay: the model wrote no usable prompt in {max_tries} tries from its chat "
                        f"template's user prefix (devices {sorted(map(str, devices))}); use replay_data=FILE.")
    return prompts[:n]


def self_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64,
                 batch_size: int = 8) -> list[str]:
    """The model's greedy answers to ``prompts``, each rendered through its chat template."""
    frame = chat_frame(tokenizer)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    answers = _generate(model, tokenizer, texts, max_new_tokens, False, _end_ids(tokenizer, frame), batch_size)
    return [a.split(frame.end_of_turn)[0].strip() for a in answers]


def self_replay_rows(model, tokenizer, n: int, data_format: str, *, seed: int = 0,
                     max_new_tokens: int = 64) -> list[dict[str, Any]]:
    """``n`` rows (``chat`` or ``instruction`` format) of the model's own prompts and answers."""
    if data_format not in ("chat", "instruction"):
        raise ConfigError(f"self-replay writes chat or instruction rows; the training data has {data_format} "
                          "rows. Use replay_data=FILE with rows of that format instead.")
    was_training = model.training
    model.eval()
    try:
        prompts = magpie_prompts(model, tokenizer, n, seed=seed)
        answers = self_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    finally:
        model.train(was_training)
    pairs = [(p, a) for p, a in zip(prompts, answers) if a]
    if not pairs:
        raise DataError("self-replay: the model answered none of its own prompts; use replay_data=FILE.")
    if data_format == "chat":
        return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]} for p, a in pairs]
    return [{"instruction": p, "output": a} for p, a in pairs]
