"""Tiny random-init models and tiny data files for the training tests (seconds per run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .train_helpers import tiny_llama_config, write_rows


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32) with lorakit's character tokenizer and chat template."""
    from transformers import LlamaForCausalLM

    from lorakit.tasks import build_tokenizer

    path = tmp_path_factory.mktemp("tiny_lm")
    tok = build_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm_no_template(tmp_path_factory, tiny_lm) -> Path:
    """The same model with a tokenizer that has no chat template (plain instruction rendering)."""
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_lm_plain")
    for f in tiny_lm.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, path / f.name)
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    tok.chat_template = None
    tok.save_pretrained(path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_cls(tmp_path_factory) -> Path:
    from transformers import LlamaForSequenceClassification

    from lorakit.tasks import build_tokenizer

    path = tmp_path_factory.mktemp("tiny_cls")
    tok = build_tokenizer()
    torch.manual_seed(0)
    LlamaForSequenceClassification(tiny_llama_config(tok, num_labels=2)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def instr_file(tmp_path) -> Path:
    from lorakit.tasks import write_jsonl

    return write_jsonl("rev", tmp_path / "train.jsonl", n=48, seed=0)


@pytest.fixture
def cls_file(tmp_path) -> Path:
    rows = [{"text": w, "label": "pos" if w[0] < "n" else "neg"}
            for w in ("apple", "zebra", "mango", "yak", "berry", "plum", "kiwi", "xenon") * 4]
    return write_rows(tmp_path / "cls.jsonl", rows)


