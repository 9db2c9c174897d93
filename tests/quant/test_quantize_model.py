"""quantize_model: which Linears are replaced, what stays in full precision, and bad input."""

from __future__ import annotations

import pytest
import torch
from qhelpers import one_thread  # noqa: F401  (fixture)
from torch import nn

from lorakit.errors import QuantizationError
from lorakit.quant import QuantLinear, quantize_model

from conftest import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _linear_paths(model, cls):
    return sorted(p for p, m in model.named_modules() if type(m) is cls)


def test_replaces_linears_but_not_head_or_skip(ids):
    model = tiny_llama()
    ref = model(ids).logits
    n_linear = len(_linear_paths(model, nn.Linear))
    quantize_model(model, "nf4", skip=["down_proj"], compute_dtype=torch.float32)
    assert _linear_paths(model, nn.Linear) == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert len(_linear_paths(model, QuantLinear)) == n_linear - 3
    out = model(ids).logits
    assert ((out - ref).norm() / ref.norm()) < 0.15
    assert isinstance(model.model.embed_tokens, nn.Embedding)


@pytest.mark.parametrize("quant_type", ["fp4", "int8", "int8_asym"])
def test_other_formats(quant_type, ids):
    model = tiny_llama()
    ref = model(ids).logits
    quantize_model(model, quant_type, compute_dtype=torch.float32)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.quant_type == quant_type
    tol = 0.2 if quant_type == "fp4" else 0.02
    assert ((model(ids).logits - ref).norm() / ref.norm()) < tol


def test_quantize_head_when_untied(ids):
    model = tiny_llama()
    model.config.tie_word_embeddings = False
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    quantize_model(model, quantize_head=True)
    assert isinstance(model.lm_head, QuantLinear)


def test_tied_head_refused():
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight  # tie them
    with pytest.raises(QuantizationError, match="tied|shared"):
        quantize_model(model, quantize_head=True)
    quantize_model(model)  # default: head kept, fine
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_gpt2_conv1d_is_not_a_linear():
    model = tiny_gpt2()
    quantize_model(model)
    assert _linear_paths(model, QuantLinear) == []  # GPT-2 uses Conv1D; only its head is a Linear


def test_bad_arguments():
    with pytest.raises(QuantizationError, match="skip entry 'nope'"):
        quantize_model(tiny_llama(), skip=["nope"])
    with pytest.raises(QuantizationError, match="quant_type"):
        quantize_model(tiny_llama(), "int3")
    with pytest.raises(QuantizationError, match="blocksize"):
        quantize_model(tiny_llama(), blocksize=63)
    with pytest.raises(QuantizationError, match="compute_dtype"):
        quantize_model(tiny_llama(), compute_dtype=torch.float64)
