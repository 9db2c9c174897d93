"""Pretrain lorakit's embedded base model: a tiny Llama that knows the base tasks and nothing else.

    python scripts/train_embedded_base.py            # writes src/lorakit/assets/tiny-base/

A plain torch loop (AdamW, linear warm-up then cosine decay, seeded) over fresh rows of the base
tasks' *train* split, the four tasks mixed in equal parts in every batch. The loss is on the answer
only (the answer's characters, its newline and ``</s>``); prompt positions are masked out (-100),
because the prompt's letters are random and predicting them teaches nothing. At the end every
built-in task is scored on its *eval* split, and the checkpoint, tokenizer and
``lorakit_tasks.json`` are written to a temporary directory that then replaces the old one, so an
interrupted run never leaves a half-written checkpoint behind. Same seed + same thread count = same
weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing lorakit

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lorakit._fs import atomic_write_json  # noqa: E402
from lorakit.eval.task_eval import evaluate_tasks  # noqa: E402
from lorakit.tasks import (  # noqa: E402
    DEFAULT_TASK,
    PROMPT_FORMAT_VERSION,
    build_tokenizer,
    embedded_model_dir,
    format_answer,
    format_prompt,
    get,
    names,
)

IGNORE = -100


def model_config(tokenizer) -> LlamaConfig:
    """The embedded model's shape: ~0.8 M parameters, 3.3 MB in fp32."""
    return LlamaConfig(
        vocab_size=len(tokenizer),  # 100
        hidden_size=128,
        intermediate_size=352,  # 2.75 x hidden, rounded to a multiple of 32
        num_hidden_layers=4,
        num_attention_heads=4,  # head_dim 32
        num_key_value_heads=4,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def make_batch(tokenizer, rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids / attention_mask / labels with the loss on the answer only."""
    # <s> + prompt, then answer + </s>; only the second part is scored.
    prompts = tokenizer([format_prompt(r) for r in rows], add_special_tokens=True)["input_ids"]
    answers = tokenizer([format_answer(r) for r in rows], add_special_tokens=False)["input_ids"]
    seqs = [p + a + [tokenizer.eos_token_id] for p, a in zip(prompts, answers)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        labels[i, len(p) : len(s)] = torch.tensor(s[len(p) :])  # the model shifts labels by one itself
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine down to lr/10


def train(args) -> tuple[LlamaForCausalLM, object, dict]:
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(model_config(tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters; threads={torch.get_num_threads()}", flush=True)

    # No weight decay on norms (1-D gains); decay elsewhere keeps unused embedding rows small.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    base = names("base")
    per_task = args.batch_size // len(base)
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        # Fresh rows every step (seeded by the step): the train split is far larger than what we see.
        rows = [r for name in base for r in get(name).examples(per_task, seed=args.seed * 1_000_003 + step)]
        batch = make_batch(tokenizer, rows)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  loss {loss.item():.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{time.time() - t0:6.1f}s",
                flush=True,
            )
        if args.eval_every and step and step % args.eval_every == 0:
            scores = evaluate_tasks(model, tokenizer, base, n=64, split="eval")
            print("   eval " + "  ".join(str(s) for s in scores.values()), flush=True)
    seconds = time.time() - t0
    stats = {
        "steps": args.steps,
        "batch_size": per_task * len(base),
        "lr": args.lr,
        "seed": args.seed,
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "parameters": n_params,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    return model, tokenizer, stats


def portable_tokenizer_config(path: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast``, which transformers 4.x and 5.x both load.

    transformers 5 writes its own class name (``TokenizersBackend``), unknown to 4.x's AutoTokenizer.
    """
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_write_json(config_path, config)


def save(model, tokenizer, stats: dict, accuracy: dict[str, float], out: Path) -> None:
    """Write the checkpoint to a sibling temp dir, then swap it in (old dir removed only after)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("\n")]
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        portable_tokenizer_config(tmp)
        atomic_write_json(
            tmp / "lorakit_tasks.json",
            {
                "prompt_format_version": PROMPT_FORMAT_VERSION,
                "prompt_format": "{instruction} {input}=",
                "answer_format": "{output}\\n",
                "base_tasks": names("base"),
                "new_tasks": names("new"),
                "default_task": DEFAULT_TASK,
                "eval_accuracy": accuracy,  # split="eval", n=200, seed=1234
                "training": stats,
            },
        )
        # mkdtemp/mkstemp create owner-only files; package data must be world-readable.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3500)
    p.add_argument(
        "--batch-size", type=int, default=64, help="rows per step, split evenly over the base tasks"
    )
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=500, help="0 disables the in-training eval")
    p.add_argument("--out", type=Path, default=embedded_model_dir(check=False))
    p.add_argument("--no-save", action="store_true", help="train and score only (for experiments)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tokenizer, stats = train(args)
    t0 = time.time()
    scores = evaluate_tasks(model, tokenizer, names(), n=200, split="eval")
    print(f"final eval (n=200, split=eval, {time.time() - t0:.1f}s):")
    for name, s in scores.items():
        print(f"  {'base' if get(name).base else 'new '}  {s}")
    accuracy = {name: round(s.accuracy, 4) for name, s in scores.items()}
    if not args.no_save:
        save(model, tokenizer, stats, accuracy, args.out)
        size = sum(f.stat().st_size for f in args.out.iterdir())
        print(f"saved {args.out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
