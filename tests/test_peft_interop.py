"""Adapters move both ways between lorakit and PEFT with identical outputs (PEFT is a test-only reference)."""

import pytest
import torch

import lorakit

from conftest import tiny_bert_cls, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

CASES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], r=4, lora_alpha=8,
                               rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3})),
    "llama-rslora-all-linear": (tiny_llama, dict(target_modules="all-linear", r=8, lora_alpha=4, use_rslora=True)),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc", "c_proj"], r=4, lora_alpha=16)),
    "bert-cls": (tiny_bert_cls, dict(target_modules=["query", "value", "dense"], r=4, lora_alpha=8,
                                     modules_to_save=["classifier"], bias="lora_only")),
}


def _perturb(model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_loads_in_lorakit(case, tmp_path, ids):
    make, kw = CASES[case]
    pm = peft.get_peft_model(make(), peft.LoraConfig(**kw))
    _perturb(pm)
    pm.eval()
    want = _logits(pm, ids)
    pm.save_pretrained(tmp_path / "p")
    ours = lorakit.load_adapter(make(), tmp_path / "p")
    torch.testing.assert_close(_logits(ours, ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_lorakit_saved_loads_in_peft(case, tmp_path, ids):
    make, kw = CASES[case]
    ours = lorakit.inject(make(), lorakit.LoraConfig(**kw))
    _perturb(ours)
    want = _logits(ours, ids)
    lorakit.save_adapter(ours, tmp_path / "k")
    pm = peft.PeftModel.from_pretrained(make(), tmp_path / "k")
    pm.eval()
    torch.testing.assert_close(_logits(pm, ids), want, rtol=1e-5, atol=1e-5)


def test_merged_model_matches_peft_merge(ids):
    make, kw = CASES["llama"]
    ours = lorakit.inject(make(), lorakit.LoraConfig(**kw))
    _perturb(ours)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        lorakit.save_adapter(ours, d)
        pm = peft.PeftModel.from_pretrained(make(), d)
    want = pm.merge_and_unload()
    got = lorakit.merge_and_unload(ours)
    for name, w in want.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], w, rtol=1e-5, atol=1e-6)
