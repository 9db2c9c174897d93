"""Chunked cross-entropy: value and gradients equal to the unchunked F.cross_entropy over full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.errors import ConfigError
from lorakit.losses import chunked_cross_entropy, hidden_states_instead_of_logits

from conftest import tiny_llama


def _reference(hidden, head, labels, reduction):
    return F.cross_entropy(head(hidden).float().reshape(-1, head.out_features if hasattr(head, "out_features") else head.weight.shape[0]),
                           labels.reshape(-1), ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fused_linear_matches_full_logits(bias, train_head, chunk, reduction):
    torch.manual_seed(0)
    head = nn.Linear(8, 50, bias=bias)
    head.requires_grad_(train_head)
    h = torch.randn(2, 9, 8, requires_grad=True)
    y = torch.randint(0, 50, (2, 9))
    y[0, :3] = -100  # ignored targets (prompt tokens)
    ref = _reference(h, head, y, reduction)
    ref.backward()
    ref_grads = [h.grad.clone()] + [p.grad.clone() for p in head.parameters() if p.requires_grad]
    h.grad = None
    for p in head.parameters():
        p.grad = None
    got = chunked_cross_entropy(h, head, y, chunk_tokens=chunk, reduction=reduction)
    (got * 1.0).backward()
    grads = [h.grad] + [p.grad for p in head.parameters() if p.requires_grad]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    head = nn.Linear(4, 10)
    h = torch.randn(5, 4, requires_grad=True)
    y = torch.full((5,), -100)
    loss = chunked_cross_entropy(h, head, y, chunk_tokens=2)
    loss.backward()
    assert float(loss) == 0.0 and float(h.grad.abs().sum()) == 0.0


def test_lora_wrapped_head_takes_the_checkpointed_path_with_equal_gradients():
    model = tiny_llama(seed=1)
    model = lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"],
                                                     init_lora_weights=False))
    ids = torch.randint(0, 100, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100

    def full():
        logits = model(input_ids=ids).logits[:, :-1]
        return F.cross_entropy(logits.float().reshape(-1, 100), labels[:, 1:].reshape(-1), reduction="sum")

    def chunked():
        with hidden_states_instead_of_logits(model) as head:
            hidden = model(input_ids=ids).logits
        assert hidden.shape == (2, 12, 32)
        return chunked_cross_entropy(hidden[:, :-1], head, labels[:, 1:], chunk_tokens=5)

    results = []
    for fn in (full, chunked):
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)
    assert g1.keys() == g2.keys() and any("lm_head" in n for n in g1)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], atol=1e-5, rtol=1e-4)
    # the head is restored: logits again
    assert model(input_ids=ids).logits.shape[-1] == 100


def test_tied_plain_head_gradients_reach_the_embedding():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=40, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 40, (2, 7))
    model.zero_grad()
    ref = F.cross_entropy(model(input_ids=ids).logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1), reduction="sum")
    ref.backward()
    ref_g = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    with hidden_states_instead_of_logits(model) as head:
        hidden = model(input_ids=ids).logits
    got = chunked_cross_entropy(hidden[:, :-1], head, ids[:, 1:], chunk_tokens=4)
    got.backward()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.model.embed_tokens.weight.grad, ref_g, atol=1e-5, rtol=1e-5)


def test_head_is_restored_after_an_exception():
    model = tiny_llama()
    with pytest.raises(RuntimeError, match="boom"), hidden_states_instead_of_logits(model):
        raise RuntimeError("boom")
    assert "forward" not in vars(model.lm_head)
    assert model(input_ids=torch.tensor([[1, 2]])).logits.shape[-1] == 100


def test_refuses_models_that_change_logits_after_the_head():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, vocab_size=40, final_logit_softcapping=30.0)
    with pytest.raises(ConfigError, match="final_logit_softcapping"), hidden_states_instead_of_logits(Gemma2ForCausalLM(cfg)):
        pass


@pytest.mark.parametrize("bad", [dict(reduction="none"), dict(labels=torch.zeros(3, dtype=torch.long))])
def test_bad_arguments_are_named(bad):
    head = nn.Linear(4, 10)
    h = torch.randn(5, 4)
    labels = bad.pop("labels", torch.zeros(5, dtype=torch.long))
    with pytest.raises(ConfigError):
        chunked_cross_entropy(h, head, labels, **bad)
