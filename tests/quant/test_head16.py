"""Frozen heads read in vocabulary tiles: the 16-bit head/embedding (quant/head16.py) and packed GGUF
heads through lorakit.losses' online-softmax path. Every result is compared with the naive unchunked
fp32 formula written here, ``F.cross_entropy(h @ W.float().T (+ b), y)``, over the same rounded or
gguf-dequantized weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.errors import ConfigError
from lorakit.losses import chunked_cross_entropy, hidden_states_instead_of_logits
from lorakit.quant.head16 import FrozenEmbedding, FrozenHead, keep_head_16bit

from conftest import tiny_llama


def _naive(h, w, b, y, reduction="sum"):
    logits = h.reshape(-1, h.shape[-1]) @ w.float().T
    if b is not None:
        logits = logits + b.float()
    return F.cross_entropy(logits, y.reshape(-1), ignore_index=-100, reduction=reduction)


def _loss_and_grad(fn, h):
    h = h.detach().clone().requires_grad_(True)
    loss = fn(h)
    loss.backward()
    return loss.detach(), h.grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tile_rows,chunk", [(7, 3), (16, 5), (50, 64), (13, None), (None, None)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_frozen_16bit_head_matches_the_naive_fp32_formula(bias, tile_rows, chunk, reduction):
    torch.manual_seed(0)
    w = torch.randn(50, 8).to(torch.bfloat16)  # 50 rows: tiles of 7/16/13 leave an uneven last tile
    b = torch.randn(50) if bias else None
    head = FrozenHead(w, b, torch.float32)
    h = torch.randn(2, 9, 8) * 3
    y = torch.randint(0, 50, (2, 9))
    y[0, :3] = -100
    y[1, 8] = 49  # the last row of the last tile
    ref, ref_g = _loss_and_grad(lambda x: _naive(x, w, b, y, reduction), h)
    got, got_g = _loss_and_grad(
        lambda x: chunked_cross_entropy(x, head, y, chunk_tokens=chunk, tile_rows=tile_rows, reduction=reduction), h)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_g, ref_g, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tile_rows", [1, 7, 100])
def test_frozen_fp32_linear_takes_the_tiled_path_with_equal_results(tile_rows):
    torch.manual_seed(1)
    lin = nn.Linear(8, 30).requires_grad_(False)
    h = torch.randn(11, 8)
    y = torch.randint(0, 30, (11,))
    y[4] = -100
    ref, ref_g = _loss_and_grad(lambda x: _naive(x, lin.weight, lin.bias, y), h)
    got, got_g = _loss_and_grad(lambda x: chunked_cross_entropy(x, lin, y, tile_rows=tile_rows, chunk_tokens=4), h)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_g, ref_g, atol=1e-5, rtol=1e-5)


def test_large_logits_do_not_overflow_the_online_softmax():
    w = torch.randn(40, 4).to(torch.bfloat16)
    h = torch.randn(6, 4) * 200  # logits in the thousands: exp would overflow without the running max
    y = torch.randint(0, 40, (6,))
    head = FrozenHead(w, None, torch.float32)
    ref, ref_g = _loss_and_grad(lambda x: _naive(x, w, None, y), h)
    got, got_g = _loss_and_grad(lambda x: chunked_cross_entropy(x, head, y, tile_rows=6), h)
    assert torch.isfinite(got) and torch.isfinite(got_g).all()
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(got_g, ref_g, atol=1e-5, rtol=1e-5)


def test_labels_outside_the_vocabulary_are_refused():
    head = FrozenHead(torch.randn(10, 4).to(torch.bfloat16), None, torch.float32)
    with pytest.raises(ConfigError, match="label 12 is outside the head's vocabulary of 10"):
        chunked_cross_entropy(torch.randn(3, 4), head, torch.tensor([1, 12, -100]))


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_tile_rows_are_named(bad):
    head = FrozenHead(torch.randn(10, 4).to(torch.bfloat16), None, torch.float32)
    with pytest.raises(ConfigError, match="tile_rows"):
        chunked_cross_entropy(torch.randn(3, 4), head, torch.tensor([1, 2, 3]), tile_rows=bad)


def test_head_forward_and_input_gradient_equal_the_rounded_fp32_linear(monkeypatch):
    from lorakit.quant import head16

    monkeypatch.setattr(head16, "TILE_ELEMENTS", 7 * 8)  # tiles of 7 rows over 30: uneven
    torch.manual_seed(2)
    w = torch.randn(30, 8).to(torch.bfloat16)
    b = torch.randn(30)
    head = FrozenHead(w, b, torch.float32)
    x = torch.randn(2, 5, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref = head(x), x_ref @ w.float().T + b
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    head.to(torch.float32)  # .to(dtype) does not cast the 16-bit weight
    assert head.weight.dtype == torch.bfloat16


def _rounded_reference(model: nn.Module) -> nn.Module:
    """The model with its head and embedding rounded to bf16 and kept as fp32 parameters."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in (ref.get_input_embeddings(), ref.get_output_embeddings()):
            m.weight.copy_(m.weight.to(torch.bfloat16).float())
    return ref


@pytest.mark.parametrize("tied", [True, False])
def test_keep_head_16bit_on_a_lora_model_gives_the_rounded_models_loss_and_gradients(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).eval()
    model = lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    ref = _rounded_reference(model)
    note = keep_head_16bit(model)
    assert "kept frozen in bfloat16" in note
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, FrozenHead) and isinstance(emb, FrozenEmbedding)
    assert head.weight.dtype == emb.weight.dtype == torch.bfloat16
    assert (head.weight is emb.weight) == tied
    ids = torch.randint(0, 100, (2, 10))
    labels = ids.clone()
    labels[:, :3] = -100

    ref.zero_grad()
    logits = ref(input_ids=ids).logits[:, :-1]  # the naive fp32 path over the rounded weights
    ref_loss = F.cross_entropy(logits.reshape(-1, 100), labels[:, 1:].reshape(-1), reduction="sum")
    ref_loss.backward()
    with hidden_states_instead_of_logits(model) as h:
        hidden = model(input_ids=ids).logits
    loss = chunked_cross_entropy(hidden[:, :-1], h, labels[:, 1:], chunk_tokens=4, tile_rows=30)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and got
    for n in got:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4)
    # plain logits (generation, the unchunked loss) are the rounded model's too
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_trainable_or_adapted_heads_are_left_alone():
    model = tiny_llama()  # untied (LlamaConfig default)
    model = lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    before = model.get_output_embeddings()
    note = keep_head_16bit(model)
    assert model.get_output_embeddings() is before and "head" in note
    assert isinstance(model.get_input_embeddings(), FrozenEmbedding)  # the frozen, untied embedding still is

    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    head = model.get_output_embeddings()
    assert "kept" in keep_head_16bit(model) and model.get_output_embeddings() is head


def test_a_tied_pair_with_an_adapted_embedding_stays_as_it_is():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=40, tie_word_embeddings=True)
    model = lorakit.inject(LlamaForCausalLM(cfg), lorakit.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    head = model.get_output_embeddings()
    note = keep_head_16bit(model)
    assert "tied" in note and model.get_output_embeddings() is head
    assert head.weight.dtype == torch.float32


def test_bad_dtype_is_refused():
    with pytest.raises(ConfigError, match="keep_head_16bit: dtype"):
        keep_head_16bit(tiny_llama(), torch.float32)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_packed_gguf_head_matches_the_naive_formula_over_ggufs_dequantized_weight(qtype):
    gguf = pytest.importorskip("gguf", reason="the gguf package is needed for GGUF heads")
    from lorakit.quant.gguf_linear import gguf_linear

    rows, cols = 90, 64
    rng = np.random.default_rng(0)
    raw = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32),
                               gguf.GGMLQuantizationType[qtype])
    w = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).astype(np.float32))
    head = gguf_linear(torch.from_numpy(raw), qtype, (rows, cols), compute_dtype=torch.float32)
    h = torch.randn(13, cols)
    y = torch.randint(0, rows, (13,))
    y[2] = -100
    ref, ref_g = _loss_and_grad(lambda x: _naive(x, w, None, y), h)
    got, got_g = _loss_and_grad(lambda x: chunked_cross_entropy(x, head, y, tile_rows=32, chunk_tokens=5), h)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_g, ref_g, atol=1e-5, rtol=1e-5)
