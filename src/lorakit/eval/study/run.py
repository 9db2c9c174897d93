"""The study, end to end: build the data, score the base, fine-tune and score every method × seed.

Results are appended to ``results.json`` in the output directory after every run, so an interrupted
study keeps what it measured.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..._fs import atomic_write_json
from ...data.encode import encode
from ...data.files import RawData
from ...variants.self_replay import chat_frame, self_replay_rows
from .data import CHAT_PROMPTS, docstring_text, split_rows, text_blocks, unicode_name_rows
from .runs import Method, Schedule, fine_tune, mix, prepare
from .scores import agreement, answer_scores, base_reference, greedy_answers, perplexity


@dataclass(frozen=True)
class Sizes:
    held_out: int = 48  # target rows never trained on
    max_length: int = 64  # tokens per training row (target rows are ~34, replay rows are cut here)
    text_blocks: int = 12  # blocks of real text for perplexity
    text_block: int = 64  # tokens per block
    chat_tokens: int = 32  # length of the base's reference answers to the chat prompts
    replay_prompts: int = 32  # prompts the base writes for self-replay
    replay_tokens: int = 32  # length of its answers to them
    answer_tokens: int = 16  # greedy tokens for a target answer (the longest name is 12 tokens)


class Study:
    """The fixed evaluation sets and the base model's scores, shared by every run."""

    def __init__(self, model, tokenizer, sizes: Sizes, say=print):
        self.base, self.tok, self.sizes, self.say = model, tokenizer, sizes, say
        for p in model.parameters():
            p.requires_grad_(False)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad = tokenizer.pad_token_id
        frame = chat_frame(tokenizer)  # a ConfigError naming the fix if the model has no chat template
        end = tokenizer.encode(frame.end_of_turn, add_special_tokens=False)
        self.end_ids = sorted({*(end[:1] if len(end) == 1 else []), tokenizer.eos_token_id} - {None})
        train_rows, held = split_rows(unicode_name_rows(), sizes.held_out, seed=0)
        # Target rows: an empty system turn (SmolLM2's default one would double their length).
        self.train = encode(RawData(train_rows, "instruction", "unicodedata names"), tokenizer, sizes.max_length,
                            system_prompt="")
        self.held = encode(RawData(held, "instruction", "unicodedata names (held out)"), tokenizer, 10**6,
                           system_prompt="")
        self.held_refs = [r["output"] for r in held]
        self.held_prompts = [tokenizer.apply_chat_template(
            [{"role": "system", "content": ""}, {"role": "user", "content": r["instruction"]}], tokenize=False,
            add_generation_prompt=True) for r in held]
        ids = tokenizer(docstring_text(), add_special_tokens=False)["input_ids"]
        self.blocks = text_blocks(ids, sizes.text_block, sizes.text_blocks)
        # The chat prompts as a user would send them (the template's own default system turn).
        self.chat_prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                           add_generation_prompt=True) for p in CHAT_PROMPTS]
        self.chat_answers = greedy_answers(model, tokenizer, self.chat_prompts, sizes.chat_tokens, self.end_ids)
        chat = encode(RawData([{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
                               for p, a in zip(CHAT_PROMPTS, self.chat_answers)], "chat", "chat prompts"),
                      tokenizer, 10**6)
        self.ref = base_reference(model, chat.examples, self.pad)
        say(f"evaluation sets ready: {len(self.train.examples)} training rows, {len(held)} held out, "
            f"{len(self.blocks)} text blocks, {len(CHAT_PROMPTS)} chat prompts")
        self._replay: dict[int, Any] = {}

    def score(self, model) -> dict[str, Any]:
        # Greedy answers for show (one row); the score is the teacher-forced equivalent (one forward pass).
        answer = greedy_answers(model, self.tok, self.held_prompts[:1], self.sizes.answer_tokens, self.end_ids)[0]
        agree, kl = agreement(model, self.ref)
        sample = greedy_answers(model, self.tok, self.chat_prompts[:1], self.sizes.chat_tokens, self.end_ids)[0]
        nll, exact = answer_scores(model, self.held.examples, self.pad)
        return {"target_em": exact, "target_nll": nll,
                "text_ppl": perplexity(model, self.blocks), "chat_agree": agree, "chat_kl": kl,
                "target_sample": f"{self.held_refs[0]} → {answer}", "chat_sample": sample}

    def replay_rows(self, seed: int):
        """Self-replay rows (Magpie prompts + the base's answers), encoded; written once per seed."""
        if seed not in self._replay:
            rows = self_replay_rows(self.base, self.tok, self.sizes.replay_prompts, "instruction", seed=seed,
                                    max_new_tokens=self.sizes.replay_tokens)
            self._replay[seed] = encode(RawData(rows, "instruction", "self-replay"), self.tok, self.sizes.max_length,
                                        system_prompt="").examples
        return self._replay[seed]

    def run(self, method: Method, sched: Schedule, seed: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        examples = mix(self.train.examples, self.replay_rows(seed) if method.replay else [], sched.replay, seed)
        model = prepare(self.base, method)
        lr = sched.full_lr if method.kind == "full" else sched.lr
        trained = fine_tune(model, examples, self.pad, lr, sched, seed)
        t1 = time.perf_counter()
        scores = self.score(model)
        del model
        return {"method": method.label, "seed": seed, "lr": lr, "trainable": trained["trainable"],
                "train_seconds": trained["seconds"], "eval_seconds": time.perf_counter() - t1,
                "wall_seconds": time.perf_counter() - t0, "loss_first": trained["losses"][0],
                "loss_last": trained["losses"][-1], **scores}


def run_study(model, tokenizer, methods: list[Method], seeds: list[int], sched: Schedule, sizes: Sizes,
              out: Path, settings: dict[str, Any], say=print) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    study = Study(model, tokenizer, sizes, say)
    base = {"method": "base", "seed": None, "trainable": 0, **study.score(model)}
    say(f"base: held-out exact match {base['target_em']:.1%}, answer NLL {base['target_nll']:.3f}, "
        f"docstring perplexity {base['text_ppl']:.2f} ({time.perf_counter() - t0:.0f} s)")
    result: dict[str, Any] = {"settings": {**settings, "schedule": asdict(sched), "sizes": asdict(sizes),
                                           "train_rows": len(study.train.examples)},
                              "base": base, "runs": [], "chat_prompts": list(CHAT_PROMPTS),
                              "base_chat_answers": study.chat_answers}
    for seed in seeds:
        for m in methods:
            row = study.run(m, sched, seed)
            result["runs"].append(row)
            say(f"{m.label:>16} seed {seed}: EM {row['target_em']:.1%}  NLL {row['target_nll']:.3f}  "
                f"ppl {row['text_ppl']:.2f}  agree {row['chat_agree']:.1%}  KL {row['chat_kl']:.3f}  "
                f"({row['train_seconds']:.0f} s train, {row['wall_seconds']:.0f} s in all)")
            result["wall_seconds"] = time.perf_counter() - t0
            atomic_write_json(out / "results.json", result)
    return result
