"""LoftQ (quant/loftq.py) against a reference loop written here with bitsandbytes' NF4 (CPU) and
PEFT's ``_low_rank_decomposition`` — PEFT's own ``loftq_init`` needs a GPU, its pieces do not."""

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError, UnsupportedModuleError
from lorakit.quant import QuantLinear
from lorakit.quant.loftq import loftq_inject

from conftest import tiny_llama

bnb = pytest.importorskip("bitsandbytes")
loftq_utils = pytest.importorskip("peft.utils.loftq_utils")


def reference_loftq(w, r, n_iter):
    """PEFT's loftq_init loop (num_bits=4), on CPU."""
    w = w.float()
    res = w.clone()
    for i in range(n_iter):
        # flattened: bitsandbytes' CPU dequantize mis-shapes rows shorter than a block (test_bnb_parity.py)
        q, state = bnb.functional.quantize_4bit(res.flatten(), blocksize=64, compress_statistics=False,
                                                quant_type="nf4")
        deq = bnb.functional.dequantize_4bit(q, state).reshape(w.shape)
        out = loftq_utils._low_rank_decomposition(w - deq, reduced_rank=r)
        if i + 1 < n_iter:
            res = w - out["L"] @ out["R"]
    return deq, out["R"], out["L"]


@pytest.mark.parametrize("n_iter", [1, 3])
def test_loftq_matches_the_reference_loop(n_iter):
    # lora_alpha = r: s = 1, where PEFT's A0 = R, B0 = L and lorakit's R/√s, L/√s agree.
    cfg = lorakit.LoraConfig(target_modules=["q_proj", "down_proj"], r=4, lora_alpha=4, init_lora_weights="loftq",
                             loftq_config={"loftq_bits": 4, "loftq_iter": n_iter})
    original = tiny_llama()
    weights = {p: m.weight.detach().clone() for p, m in original.named_modules() if p.endswith(("q_proj", "down_proj"))}
    model = loftq_inject(tiny_llama(), cfg)
    for path, w in weights.items():
        host = model.get_submodule(path)
        assert isinstance(host.base_layer, QuantLinear)
        deq, a, b = reference_loftq(w, 4, n_iter)
        torch.testing.assert_close(host.base_layer.dequantize_weight(), deq, rtol=0, atol=1e-6)
        ad = host.lora["default"]
        torch.testing.assert_close(ad.lora_A, a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ad.lora_B, b, rtol=1e-4, atol=1e-5)


def test_loftq_starts_closer_to_the_full_precision_model_than_qlora():
    cfg = lorakit.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=8, lora_alpha=16,
                             init_lora_weights="loftq", loftq_config={"loftq_iter": 2})
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tiny_llama()(input_ids=ids).logits
        loftq = loftq_inject(tiny_llama(), cfg)(input_ids=ids).logits
        qlora = lorakit.quantize_model(tiny_llama(), "nf4", double_quant=False, compute_dtype=torch.float32)
        qlora = lorakit.inject(qlora, lorakit.LoraConfig(target_modules=["q_proj"], r=8))(input_ids=ids).logits
    assert (loftq - want).norm() < 0.8 * (qlora - want).norm()


def test_loftq_with_dora_starts_at_the_loftq_weights():
    cfg = lorakit.LoraConfig(target_modules=["q_proj"], r=4, lora_alpha=8, init_lora_weights="loftq", use_dora=True)
    model = loftq_inject(tiny_llama(), cfg)
    q = model.model.layers[0].self_attn.q_proj
    ad = q.lora["default"]
    w = q.base_layer.dequantize_weight() + ad.scaling * ad.lora_B @ ad.lora_A
    torch.testing.assert_close(ad.lora_magnitude_vector, torch.linalg.norm(w, dim=1), rtol=1e-5, atol=1e-6)


def test_loftq_refusals():
    with pytest.raises(ConfigError, match="loftq_bits"):
        lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq", loftq_config={"loftq_bits": 2})
    with pytest.raises(ConfigError, match="init_lora_weights='loftq'"):
        loftq_inject(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    model = lorakit.quantize_model(tiny_llama(), "nf4", compute_dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModuleError, match=r"q_proj.*unquantized"):
        loftq_inject(model, lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
