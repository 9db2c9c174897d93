"""Helpers shared by the training tests (a module of its own: `conftest` is ambiguous across test folders)."""

from __future__ import annotations

import json
from pathlib import Path


def tiny_llama_config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **extra,
    )


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def quick_args(model: Path, data: Path | str, out: Path, **kw):
    from lorakit.train import TrainArgs

    base = dict(model=str(model), data=str(data), output_dir=str(out), batch_size=4, max_steps=4, lr=1e-2,
                r=4, lora_alpha=8, progress=False, threads=1, eval_rows=8, builtin_rows=32, max_length=64)
    base.update(kw)
    return TrainArgs(**base)
