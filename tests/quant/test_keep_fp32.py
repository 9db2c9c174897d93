"""quantize_model / load_quantized leave a model's ``_keep_in_fp32_modules`` as Linear layers (T5's FFN
output ``wo``, whose forward reads ``wo.weight.dtype``), as transformers' bitsandbytes path does: the set
of quantized modules is compared with what ``BitsAndBytesConfig(load_in_4bit=True)`` quantizes."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from qhelpers import one_thread  # noqa: F401  (fixture)
from torch import nn

from lorakit.quant import QuantLinear, load_quantized, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    cfg = T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    T.T5ForConditionalGeneration(cfg).save_pretrained(path)
    return path


def _quantized(model, cls):
    return sorted(n for n, m in model.named_modules() if isinstance(m, cls))


def test_t5_quantized_like_bitsandbytes_and_it_runs(t5_dir):
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    dec = torch.zeros(2, 3, dtype=torch.long)
    ours = quantize_model(T.T5ForConditionalGeneration.from_pretrained(t5_dir), compute_dtype=torch.float32)
    streamed = load_quantized(t5_dir, compute_dtype=torch.float32)
    kept = [n for n, m in ours.named_modules() if type(m) is nn.Linear]
    assert kept and all(n.endswith("DenseReluDense.wo") or n == "lm_head" for n in kept)
    assert _quantized(streamed, QuantLinear) == _quantized(ours, QuantLinear)
    with torch.no_grad():  # before: AttributeError, 'QuantLinear' object has no attribute 'weight'
        assert torch.equal(ours(input_ids=ids, decoder_input_ids=dec).logits,
                           streamed(input_ids=ids, decoder_input_ids=dec).logits)
    try:
        import bitsandbytes as bnb

        ref = T.T5ForConditionalGeneration.from_pretrained(
            t5_dir, quantization_config=T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
            device_map="cpu")
    except (ImportError, RuntimeError, ValueError) as exc:  # bitsandbytes without a CPU backend
        pytest.skip(f"bitsandbytes cannot quantize on this machine: {exc}")
    assert _quantized(ours, QuantLinear) == _quantized(ref, bnb.nn.Linear4bit)
