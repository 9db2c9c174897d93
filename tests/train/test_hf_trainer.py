"""A lorakit-injected model trains in transformers' Trainer, and only the adapter weights move."""

from __future__ import annotations

import torch

import lorakit


def test_trainer_updates_only_adapter_weights(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from lorakit.data.batches import collate
    from lorakit.data.encode import encode
    from lorakit.data.files import read_data
    from lorakit.train.model import load_tokenizer

    tok = load_tokenizer(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    examples = encode(read_data("builtin:rev", builtin_rows=16), tok, 64).examples
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=5e-2, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1, remove_unused_columns=False, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=examples,
            data_collator=lambda rows: collate(rows, tok.pad_token_id)).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all(".lora." in n for n in changed)
