"""DoRA (adapter_kinds/dora.py) against PEFT's ``use_dora`` (the reference): files both ways with the
same outputs, the same gradients, exact merges, quantized bases, and the refusals."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import AdapterStateError, LorakitError

from conftest import tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


class ConvNet(nn.Module):
    """Conv2d + Linear + Embedding, so every base kind DoRA supports is in one small model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(20, 6)
        self.conv = nn.Conv2d(6, 5, 3, padding=1)
        self.head = nn.Linear(5, 4)

    def forward(self, input_ids):
        h = self.emb(input_ids)  # (B, L, 6)
        h = self.conv(h.transpose(1, 2)[..., None].expand(-1, -1, -1, 3).contiguous())  # (B, 5, L, 3)
        return self.head(h.mean(dim=(2, 3)))


CASES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], r=4, lora_alpha=8)),
    "llama-rslora-all-linear": (tiny_llama, dict(target_modules="all-linear", r=4, lora_alpha=4, use_rslora=True)),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], r=4, lora_alpha=16)),
    "conv": (ConvNet, dict(target_modules=["emb", "conv", "head"], r=3, lora_alpha=6)),
}


def _ids(case):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 20 if case == "conv" else 100, (2, 9), generator=g)


def _out(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return getattr(out, "logits", out)


def _trained_looking(model):
    """Random factors and magnitudes, as after training (init_lora_weights=False gives random A, B;
    the magnitude starts at ‖W0 + sBA‖ and is moved here, so g ≠ 1 and DoRA differs from LoRA)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g))
            elif p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_dora_file_loads_in_lorakit(case, tmp_path):
    make, kw = CASES[case]
    pm = peft.get_peft_model(make(), peft.LoraConfig(**kw, use_dora=True, init_lora_weights=False))
    _trained_looking(pm)
    pm.eval()
    ids = _ids(case)
    want = _out(pm, ids)
    assert (want - _out(make(), ids)).abs().max() > 1e-2  # the adapter really changes the outputs
    pm.save_pretrained(tmp_path / "p")
    ours = lorakit.load_adapter(make(), tmp_path / "p")
    torch.testing.assert_close(_out(ours, ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_lorakit_dora_file_loads_in_peft(case, tmp_path):
    make, kw = CASES[case]
    ours = lorakit.inject(make(), lorakit.LoraConfig(**kw, use_dora=True, init_lora_weights=False))
    _trained_looking(ours)
    ids = _ids(case)
    want = _out(ours, ids)
    lorakit.save_adapter(ours, tmp_path / "k")
    pm = peft.PeftModel.from_pretrained(make(), tmp_path / "k")
    pm.eval()
    torch.testing.assert_close(_out(pm, ids), want, rtol=1e-5, atol=1e-5)


def test_fresh_dora_adapter_is_plain_lora_with_the_weight_norm_as_magnitude():
    """At creation m = ‖W0 + sBA‖_c (g = 1), so the layer computes plain LoRA's output."""
    make, kw = CASES["llama"]
    ids = _ids("llama")
    torch.manual_seed(5)
    ours = lorakit.inject(make(), lorakit.LoraConfig(**kw, use_dora=True, init_lora_weights=False))
    torch.manual_seed(5)  # same draws: the same factors
    plain = lorakit.inject(make(), lorakit.LoraConfig(**kw, init_lora_weights=False))
    torch.testing.assert_close(_out(ours, ids), _out(plain, ids), rtol=1e-5, atol=1e-5)
    q = ours.model.layers[0].self_attn.q_proj
    ad = q.lora["default"]
    w = q.base_layer.weight + ad.scaling * ad.lora_B @ ad.lora_A  # naive, dense
    torch.testing.assert_close(ad.lora_magnitude_vector, torch.linalg.norm(w, dim=1), rtol=1e-5, atol=1e-6)
    emb = ours.model.embed_tokens
    ad = emb.lora["default"]
    w = emb.base_layer.weight.T + ad.scaling * ad.lora_B @ ad.lora_A  # (dim, num): PEFT's norm per dim
    torch.testing.assert_close(ad.lora_magnitude_vector, torch.linalg.norm(w, dim=1), rtol=1e-5, atol=1e-6)


def test_gradients_match_peft(tmp_path):
    """One backward: the magnitude, A and B get PEFT's gradients (norm detached, §4.3)."""
    make, kw = CASES["llama"]
    pm = peft.get_peft_model(make(), peft.LoraConfig(**kw, use_dora=True, init_lora_weights=False))
    _trained_looking(pm)
    pm.save_pretrained(tmp_path / "p")
    ours = lorakit.load_adapter(make(), tmp_path / "p", trainable=True)
    ids = _ids("llama")
    pm.train()
    ours.train()
    pm(input_ids=ids, labels=ids).loss.backward()
    ours(input_ids=ids, labels=ids).loss.backward()
    want = {}
    for k, p in pm.named_parameters():
        if p.requires_grad:
            path = k.replace("base_model.model.", "").split(".lora_")[0]
            want[(path, k.split(".lora_")[1].split(".")[0])] = p.grad
    n = 0
    for k, p in ours.named_parameters():
        if p.requires_grad:
            path, _, rest = k.partition(".lora.default.")
            leaf = {"lora_A": "A" if "embed" not in path else "embedding_A",
                    "lora_B": "B" if "embed" not in path else "embedding_B",
                    "lora_magnitude_vector": "magnitude_vector"}[rest]
            torch.testing.assert_close(p.grad, want[(path, leaf)], rtol=1e-4, atol=1e-6)
            n += 1
    assert n == len(want)


@pytest.mark.parametrize("case", ["llama", "gpt2", "conv"])
def test_merge_is_exact_and_matches_peft(case, tmp_path):
    make, kw = CASES[case]
    ours = lorakit.inject(make(), lorakit.LoraConfig(**kw, use_dora=True, init_lora_weights=False))
    _trained_looking(ours)
    ids = _ids(case)
    want = _out(ours, ids)
    before = {k: v.clone() for k, v in ours.state_dict().items() if "base_layer" in k}
    lorakit.merge(ours)
    torch.testing.assert_close(_out(ours, ids), want, rtol=1e-5, atol=1e-5)
    lorakit.merge(ours)  # twice = once
    torch.testing.assert_close(_out(ours, ids), want, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(ours)
    for k, v in ours.state_dict().items():
        if k in before:
            torch.testing.assert_close(v, before[k], rtol=1e-5, atol=1e-5)  # W = W'/g − sBA: rounding only
    lorakit.save_adapter(ours, tmp_path / "k")
    pm = peft.PeftModel.from_pretrained(make(), tmp_path / "k").merge_and_unload()
    merged = lorakit.merge_and_unload(ours)
    ref = pm.state_dict()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_dora_on_quantized_base_matches_peft_on_the_dequantized_weight(quant_type, tmp_path):
    """The reference is PEFT's DoRA on an nn.Linear holding the dequantized weight."""
    from lorakit.quant import QuantLinear, dequantize_and_merge

    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = QuantLinear.from_linear(lin, quant_type, compute_dtype=torch.float32)
    ref_lin = nn.Linear(64, 48)
    with torch.no_grad():
        ref_lin.weight.copy_(q.dequantize_weight())
        ref_lin.bias.copy_(lin.bias)
    kw = dict(target_modules=["proj"], r=4, lora_alpha=8, use_dora=True, init_lora_weights=False)
    ours = lorakit.inject(_wrap(q), lorakit.LoraConfig(**kw))
    _trained_looking(ours)
    lorakit.save_adapter(ours, tmp_path / "k")
    pm = peft.PeftModel.from_pretrained(_wrap(ref_lin), tmp_path / "k").eval()
    x = torch.randn(5, 64)
    with torch.no_grad():
        want = pm(x)
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)
        with pytest.raises(AdapterStateError, match="dequantize_and_merge"):
            lorakit.merge(ours)
        merged = dequantize_and_merge(ours)
        torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-5)


def _wrap(module):
    m = nn.Sequential()
    m.add_module("proj", module)
    return m


def test_dora_needs_unmerged_layers():
    """A DoRA magnitude measured on a weight that holds a merged adapter would be wrong once that
    adapter is unmerged: refused, naming the module and the fix."""
    make, kw = CASES["llama"]
    model = lorakit.inject(make(), lorakit.LoraConfig(**kw, init_lora_weights=False), "plain")
    lorakit.merge(model)
    with pytest.raises(AdapterStateError, match=r"module 'model\.layers\.\d\.\S+' has merged adapters.*unmerge first"):
        lorakit.inject(model, lorakit.LoraConfig(**kw, use_dora=True), "dora")
    assert "dora" not in lorakit.state.model_state(model).adapters


def test_dora_delta_alone_is_refused():
    """ΔW of DoRA depends on W0: combining DoRA adapters (which needs ΔW alone) is refused."""
    make, kw = CASES["llama"]
    model = lorakit.inject(make(), lorakit.LoraConfig(**kw, use_dora=True, init_lora_weights=False), "a")
    lorakit.inject(model, lorakit.LoraConfig(**kw, use_dora=True, init_lora_weights=False), "b")
    with pytest.raises(LorakitError, match="'a' is a dora adapter"):
        lorakit.combine_adapters(model, ["a", "b"], [0.5, 0.5], "ab", method="svd")


def test_dropout_acts_on_the_low_rank_path_only():
    """Documented choice: with B = 0 (fresh adapter, g = 1) a training-mode forward with dropout is the
    base model's output exactly — the base path is never dropped (PEFT drops it and pays a 2nd matmul)."""
    make, kw = CASES["llama"]
    ids = _ids("llama")
    model = lorakit.inject(make(), lorakit.LoraConfig(**{**kw, "lora_dropout": 0.5}, use_dora=True))
    model.train()
    base = make().train()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
