"""`lorakit train` with fused_slices: the LoRA paper's GPT-2 setup (q and v of c_attn) from the CLI args."""

from __future__ import annotations

import json

import torch

import lorakit
from lorakit.adapter_kinds.sliced import SlicedAdapter
from lorakit.state import lora_layers

from .train_helpers import quick_args


def test_gpt2_q_v_slices_train_and_reload(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorakit.cli.options import build
    from lorakit.tasks import build_tokenizer, write_jsonl
    from lorakit.train import train
    from lorakit.train.args import TrainArgs

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=128,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    data = write_jsonl("rev", tmp_path / "train.jsonl", n=16, seed=0)
    # the dotted CLI form parses to the same mapping
    parsed = build(TrainArgs, ("cli", {"fused_slices.c_attn": "[true, false, true]"}))
    assert parsed.fused_slices == {"c_attn": [True, False, True]}
    train(quick_args(tmp_path / "gpt2", data, tmp_path / "run", target_modules=["c_attn"],
                     fused_slices={"c_attn": [True, False, True]}, max_steps=2, eval_rows=4))
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["fused_slices"] == {"c_attn": {"enable": [True, False, True], "heads": 1}}
    model = lorakit.load_adapter(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), tmp_path / "run" / "adapter")
    adapters = [h.lora["default"] for _, h in lora_layers(model)]
    assert len(adapters) == 2 and all(isinstance(a, SlicedAdapter) for a in adapters)
    assert all(a.lora_B.abs().sum() > 0 for a in adapters)  # trained
