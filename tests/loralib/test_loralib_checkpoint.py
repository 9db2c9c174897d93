"""loralib checkpoints → lorakit-injected transformers models → PEFT, and back.

The "loralib" side is tests/loralib/naive_loralib.py (loralib's maths restated, no lorakit import):
a transformers model whose targeted layers are swapped for naive loralib layers is the reference.
"""

from __future__ import annotations

import pytest
import torch

import lorakit
import lorakit.loralib as lora
from lorakit.adapter_kinds.sliced import SlicedAdapter
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.state import lora_layers, model_state

from .naive_loralib import NaiveEmbedding, NaiveLinear, hf_conv1d_to_naive, naive_lora_state_dict, swap
from conftest import tiny_gpt2

ENABLE = [True, False, True]  # the LoRA paper's GPT-2 setup: q and v of c_attn, not k


def tiny_roberta_cls(seed: int = 0):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    cfg = RobertaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=100, max_position_embeddings=70, num_labels=2, pad_token_id=1)
    return RobertaForSequenceClassification(cfg).eval()


def gpt2_reference(alpha=16, r=2):
    """GPT-2 with naive loralib MergedLinear(enable_lora=[T, F, T], fan_in_fan_out=True) on c_attn."""
    ref = tiny_gpt2()
    for i, block in enumerate(ref.transformer.h):
        swap(ref, f"transformer.h.{i}.attn.c_attn", hf_conv1d_to_naive(block.attn.c_attn, r, alpha, ENABLE, seed=i))
    return ref


def roberta_reference(alpha=16, r=2):
    """RoBERTa with naive loralib Linear on query and value (the paper's NLU setup) and a trained head."""
    ref = tiny_roberta_cls()
    for i, layer in enumerate(ref.roberta.encoder.layer):
        for name in ("query", "value"):
            lin = getattr(layer.attention.self, name)
            swap(ref, f"roberta.encoder.layer.{i}.attention.self.{name}",
                 NaiveLinear(lin.weight, lin.bias, r, alpha, seed=10 * i + len(name)))
    with torch.no_grad():
        for p in ref.classifier.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref


def _peft_logits(base, adapter_dir, ids):
    peft = pytest.importorskip("peft", reason="PEFT is the reference for the adapter format")
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()(ids).logits


def test_gpt2_merged_linear_checkpoint_loads_and_converts_to_peft(tmp_path, ids):
    ref = gpt2_reference()
    path = tmp_path / "lora.pt"
    torch.save({"model_state_dict": naive_lora_state_dict(ref)}, path)  # as the LoRA repo's gpt2_ft.py saves
    with torch.no_grad():
        expected = ref(ids).logits
    model = lora.load_lora_state_dict(tiny_gpt2(), path, lora_alpha=16, enable_lora={"c_attn": ENABLE})
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected)
    lorakit.save_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(_peft_logits(tiny_gpt2(), tmp_path / "peft", ids), expected)
    # the same adapter read back by lorakit itself: the sliced kind again, and back to loralib's layout
    again = lorakit.load_adapter(tiny_gpt2(), tmp_path / "peft")
    assert all(isinstance(h.lora["default"], SlicedAdapter) for _, h in lora_layers(again))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, expected)
    back = lora.lora_state_dict(again)
    original = naive_lora_state_dict(ref)
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in back)


def test_roberta_query_value_checkpoint_with_head_round_trips(tmp_path, ids):
    ref = roberta_reference()
    sd = naive_lora_state_dict(ref)
    sd.update({f"classifier.{k}": v for k, v in ref.classifier.state_dict().items()})
    torch.save(sd, tmp_path / "roberta_lora.bin")
    with torch.no_grad():
        expected = ref(ids).logits
    model = lora.load_lora_state_dict(tiny_roberta_cls(), tmp_path / "roberta_lora.bin", lora_alpha=16,
                                      modules_to_save=["classifier"])
    assert sorted(p.rpartition(".")[2] for p, _ in lora_layers(model)) == ["query", "query", "value", "value"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected)
    lorakit.save_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(_peft_logits(tiny_roberta_cls(), tmp_path / "peft", ids), expected)
    # back: lorakit adapter → loralib checkpoint → the naive loralib model gives the same logits
    lora.save_lora_state_dict(model, tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert set(back) == set(sd)
    fresh = roberta_reference()
    missing, unexpected = fresh.load_state_dict(back, strict=False)
    assert not unexpected and all("lora_" not in k and not k.startswith("classifier.") for k in missing)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, expected)


def test_peft_made_adapter_exports_to_a_loralib_checkpoint(tmp_path, ids):
    peft = pytest.importorskip("peft", reason="PEFT is the reference for the adapter format")
    torch.manual_seed(5)
    pm = peft.get_peft_model(tiny_roberta_cls(), peft.LoraConfig(r=2, lora_alpha=16, target_modules=["query", "value"],
                                                                 init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = pm.eval()(ids).logits
    model = lorakit.load_adapter(tiny_roberta_cls(), tmp_path / "peft")
    ckpt = lora.lora_state_dict(model)
    # the naive loralib model loads the exported factors and reproduces PEFT's logits
    ref = roberta_reference()
    with torch.no_grad():
        for p in ref.classifier.parameters():
            p.zero_()
        ref.classifier.load_state_dict(tiny_roberta_cls().classifier.state_dict())
    ref.load_state_dict(ckpt, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, expected)


def test_keys_that_do_not_fit_are_all_named_and_the_model_is_unchanged(tmp_path):
    ref = gpt2_reference()
    sd = naive_lora_state_dict(ref)
    sd["transformer.h.7.attn.c_attn.lora_A"] = torch.zeros(2, 32)  # no such layer
    sd["transformer.h.7.attn.c_attn.lora_B"] = torch.zeros(96, 2)
    sd["transformer.h.1.attn.c_attn.lora_A"] = torch.zeros(4, 31)  # wrong fan-in
    del sd["transformer.h.0.attn.c_attn.lora_B"]  # missing partner
    sd["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(1)  # not a LoRA tensor
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match="4 problem") as err:
        lora.load_lora_state_dict(model, sd, lora_alpha=16, enable_lora={"c_attn": ENABLE})
    for needle in ("h.7.attn.c_attn.lora_A", "h.1.attn.c_attn: lora_A has shape (4, 31)", "h.0.attn.c_attn: has lora_A but no lora_B",
                   "c_fc.weight"):
        assert needle in str(err.value)
    assert model_state(model) is None and not list(lora_layers(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_merged_layout_without_enable_lora_says_how_to_fix():
    sd = naive_lora_state_dict(gpt2_reference())
    with pytest.raises(AdapterFileError, match=r"enable_lora=\{'c_attn'"):
        lora.load_lora_state_dict(tiny_gpt2(), sd, lora_alpha=16)


def test_enable_lora_that_does_not_divide_is_an_error():
    sd = naive_lora_state_dict(gpt2_reference())
    with pytest.raises(AdapterFileError, match="does not divide"):
        lora.load_lora_state_dict(tiny_gpt2(), sd, lora_alpha=16, enable_lora={"c_attn": [True, False, True, False, True]})
    with pytest.raises(ConfigError, match="lora_alpha"):
        lora.load_lora_state_dict(tiny_gpt2(), sd, lora_alpha=0)


class _NotATensor:
    pass


def test_a_pickle_that_needs_more_than_tensors_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"transformer.h.0.attn.c_attn.lora_A": torch.zeros(2, 32), "extra": _NotATensor()}, path)
    with pytest.raises(AdapterFileError, match="needs more than tensors"):
        lora.load_lora_state_dict(tiny_gpt2(), path, lora_alpha=16)
    torch.save({"a.lora_A": torch.zeros(1), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(AdapterFileError, match="not tensors"):
        lora.read_checkpoint(tmp_path / "mixed.pt")
    (tmp_path / "damaged.pt").write_bytes(b"\x80\x02garbage" * 4)
    with pytest.raises(AdapterFileError, match="damaged"):
        lora.read_checkpoint(tmp_path / "damaged.pt")


def test_embedding_and_linear_checkpoint_with_lora_only_biases(tmp_path, ids):
    """loralib Embedding on GPT-2's wte + Linear-style (fan_in_fan_out) LoRA on c_fc, bias='lora_only'."""
    ref = tiny_gpt2()
    swap(ref, "transformer.wte", NaiveEmbedding(ref.transformer.wte.weight, 4, 8))
    ref.lm_head.weight = ref.transformer.wte.weight  # keep GPT-2's tied head on the base table
    for i, block in enumerate(ref.transformer.h):
        swap(ref, f"transformer.h.{i}.mlp.c_fc", hf_conv1d_to_naive(block.mlp.c_fc, 4, 8, seed=i))
        with torch.no_grad():
            ref.transformer.h[i].mlp.c_fc.bias.add_(0.5)  # a trained bias travels in the checkpoint
    sd = naive_lora_state_dict(ref, bias="lora_only")
    assert "transformer.h.0.mlp.c_fc.bias" in sd
    with torch.no_grad():
        expected = ref(ids).logits
    model = lora.load_lora_state_dict(tiny_gpt2(), sd, lora_alpha=8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected)
    lorakit.save_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(_peft_logits(tiny_gpt2(), tmp_path / "peft", ids), expected)
