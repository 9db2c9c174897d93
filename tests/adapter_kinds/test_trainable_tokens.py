"""``trainable_token_indices`` (adapter_kinds/trainable_tokens.py) against PEFT: only the chosen rows
train, files both ways with identical outputs (tied and untied embeddings), merge exact."""

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError, UnsupportedModuleError

from conftest import tiny_llama

peft = pytest.importorskip("peft")


def tiny_tied_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


MODELS = {"untied": tiny_llama, "tied": tiny_tied_llama}
TOKENS = [3, 5, 7, 42]


def _ids():  # the chosen tokens appear in the input
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    ids[0, :4] = torch.tensor(TOKENS)
    return ids


def _logits(model):
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _train_like(model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_peft_file_loads_in_lorakit(arch, tmp_path):
    make = MODELS[arch]
    pm = peft.get_peft_model(make(), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                                                     trainable_token_indices=TOKENS))
    _train_like(pm)
    pm.eval()
    want = _logits(pm)
    pm.save_pretrained(tmp_path / "p")
    ours = lorakit.load_adapter(make(), tmp_path / "p")
    torch.testing.assert_close(_logits(ours), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_lorakit_file_loads_in_peft_and_merges_exactly(arch, tmp_path):
    make = MODELS[arch]
    ours = lorakit.inject(make(), lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                                                     trainable_token_indices=TOKENS))
    _train_like(ours)
    want = _logits(ours)
    assert (want - _logits(make())).abs().max() > 1e-2
    lorakit.save_adapter(ours, tmp_path / "k")
    pm = peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval()
    torch.testing.assert_close(_logits(pm), want, rtol=1e-5, atol=1e-5)
    lorakit.merge(ours)
    torch.testing.assert_close(_logits(ours), want, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(ours)
    torch.testing.assert_close(_logits(ours), want, rtol=1e-5, atol=1e-5)
    merged = lorakit.merge_and_unload(ours)
    ref = pm.merge_and_unload().state_dict()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6)


def test_only_the_chosen_rows_change_when_training():
    """Naive reference: after an optimizer step, embedding rows outside TOKENS are the original ones."""
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"],
                                                            trainable_token_indices={"embed_tokens": TOKENS}))
    before = tiny_llama().model.embed_tokens.weight.detach()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    merged = lorakit.merge_and_unload(model).model.embed_tokens.weight.detach()
    others = [i for i in range(100) if i not in TOKENS]
    assert torch.equal(merged[others], before[others])
    assert (merged[TOKENS] - before[TOKENS]).abs().amax(dim=1).min() > 0  # every chosen row trained


def test_bad_token_indices():
    with pytest.raises(ConfigError, match=r"embed_tokens.*\[0, 100\)"):
        lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 100]))
    with pytest.raises(UnsupportedModuleError, match=r"q_proj.*nn.Embedding"):
        lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["v_proj"],
                                                        trainable_token_indices={"q_proj": [1]}))
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"embed_tokens.*both a LoRA target"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["embed_tokens"], trainable_token_indices=[1]))
    assert lorakit.state.model_state(model) is None
