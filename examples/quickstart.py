"""Quickstart: inject LoRA into a (tiny, random-init) Llama, train a few steps, save in PEFT's format,
load it back, merge. Runs offline in seconds."""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=256))
model = lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
print(lorakit.trainable_parameters(model))

opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
batch = torch.randint(0, 256, (4, 32))
model.train()
for step in range(20):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step % 5 == 0:
        print(f"step {step:2d}  loss {loss.item():.3f}")

model.eval()
with tempfile.TemporaryDirectory() as out, torch.no_grad():
    lorakit.save_adapter(model, out)
    y = model(input_ids=batch).logits
    merged = lorakit.merge_and_unload(model)
    print("merged == unmerged:", torch.allclose(merged(input_ids=batch).logits, y, atol=1e-5))
    print("plain class again:", type(merged.model.layers[0].self_attn.q_proj).__name__)
