"""PiSSA / OLoRA initialisation (adapter_kinds/weight_inits.py) and the conversion to a plain LoRA on
the original weights (init_conversion.py), against PEFT and against naive formulas."""

import pytest
import torch

import lorakit
from lorakit.errors import AdapterFileError, ConfigError, LorakitError, UnsupportedModuleError
from lorakit.init_conversion import save_as_lora

from conftest import tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

CASES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)),
    "llama-rslora": (tiny_llama, dict(target_modules=["q_proj", "o_proj"], r=4, lora_alpha=4, use_rslora=True,
                                      rank_pattern={"o_proj": 2}, alpha_pattern={"q_proj": 3})),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=16)),
}


def _ids():
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _train_like(model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _base_weights(model):
    return {k.replace("base_model.model.", "").replace(".base_layer", ""): v.detach().clone()
            for k, v in model.state_dict().items() if "lora" not in k and "magnitude" not in k}


# PEFT's olora_init ignores fan_in_fan_out (QR of GPT-2's (in, out) weight gives factors of the wrong
# shapes), so OLoRA on Conv1D is compared with the naive formula only.
PEFT_PAIRS = [(c, i) for c in sorted(CASES) for i in ("pissa", "olora") if (c, i) != ("gpt2", "olora")]


@pytest.mark.parametrize("case,init", PEFT_PAIRS)
def test_init_changes_the_base_like_peft(case, init):
    make, kw = CASES[case]
    ids = _ids()
    want = _logits(make(), ids)
    pm = peft.get_peft_model(make(), peft.LoraConfig(**kw, init_lora_weights=init)).eval()
    ours = lorakit.inject(make(), lorakit.LoraConfig(**kw, init_lora_weights=init))
    # the model computes W_res + s·B0A0 = W: the same outputs as before
    torch.testing.assert_close(_logits(ours, ids), want, rtol=1e-4, atol=1e-4)
    # the residual left in the base is PEFT's
    ref = _base_weights(pm)
    for k, v in _base_weights(ours).items():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-5)
    # the factors are PEFT's
    p_sd = {k.replace("base_model.model.", "").replace(".default", ""): v for k, v in pm.state_dict().items()}
    for name, p in ours.named_parameters():
        if ".lora.default." in name:
            path, _, leaf = name.partition(".lora.default.")
            torch.testing.assert_close(p, p_sd[f"{path}.{leaf}.weight"], rtol=1e-5, atol=1e-5)


def test_pissa_takes_the_principal_part():
    """Naive reference: s·B0A0 = U_r S_r V_rᵀ of the original W, the residual holds the rest."""
    make, kw = CASES["llama"]
    w = make().model.layers[0].self_attn.q_proj.weight.detach().clone()
    ours = lorakit.inject(make(), lorakit.LoraConfig(**kw, init_lora_weights="pissa"))
    q = ours.model.layers[0].self_attn.q_proj
    ad = q.lora["default"]
    u, s, vh = torch.linalg.svd(w)
    principal = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    torch.testing.assert_close(ad.scaling * ad.lora_B @ ad.lora_A, principal, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q.base_layer.weight, w - principal, rtol=1e-4, atol=1e-5)


def test_olora_on_conv1d_is_the_qr_of_the_out_in_weight():
    """Naive reference for GPT-2's transposed Conv1D: W = Q R with W (out, in) = weightᵀ."""
    make, kw = CASES["gpt2"]
    w = make().transformer.h[0].attn.c_attn.weight.detach().T.clone()  # (out, in)
    ours = lorakit.inject(make(), lorakit.LoraConfig(**kw, init_lora_weights="olora"))
    c = ours.transformer.h[0].attn.c_attn
    ad = c.lora["default"]
    q, r = torch.linalg.qr(w)
    torch.testing.assert_close(ad.lora_B, q[:, :4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ad.lora_A, r[:4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.base_layer.weight.T, w - ad.scaling * q[:, :4] @ r[:4], rtol=1e-5, atol=1e-5)


def test_pissa_niter_is_a_close_randomized_svd():
    make, kw = CASES["llama"]
    w = make().model.layers[0].self_attn.q_proj.weight.detach().clone()
    torch.manual_seed(0)
    ours = lorakit.inject(make(), lorakit.LoraConfig(**kw, init_lora_weights="pissa_niter_8"))
    q = ours.model.layers[0].self_attn.q_proj
    ad = q.lora["default"]
    # residual + s·BA = W exactly (whatever the randomized SVD found) …
    torch.testing.assert_close(q.base_layer.weight + ad.scaling * ad.lora_B @ ad.lora_A, w, rtol=1e-5, atol=1e-5)
    # … and the adapter holds nearly the top-r singular values
    top = torch.linalg.svdvals(w)[:4]
    got = torch.linalg.svdvals(ad.scaling * ad.lora_B @ ad.lora_A)[:4]
    torch.testing.assert_close(got, top, rtol=5e-2, atol=1e-3)


@pytest.mark.parametrize("case,init", [(c, i) for c in sorted(CASES) for i in ("pissa", "olora")])
def test_lorakit_conversion_loads_in_peft_on_the_original_model(case, init, tmp_path):
    make, kw = CASES[case]
    ours = lorakit.inject(make(), lorakit.LoraConfig(**kw, init_lora_weights=init))
    lorakit.save_adapter(ours, tmp_path / "init")
    _train_like(ours)
    ids = _ids()
    want = _logits(ours, ids)  # trained adapter on the residual base
    save_as_lora(ours, tmp_path / "lora", tmp_path / "init")
    pm = peft.PeftModel.from_pretrained(make(), tmp_path / "lora").eval()  # the ORIGINAL base
    torch.testing.assert_close(_logits(pm, ids), want, rtol=1e-4, atol=1e-4)
    back = lorakit.load_adapter(make(), tmp_path / "lora")
    torch.testing.assert_close(_logits(back, ids), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_conversion_loads_in_lorakit_and_matches_ours(init, tmp_path):
    # (PEFT refuses the conversion with rsLoRA + rank/alpha patterns; lorakit's keeps s = α/√r exact,
    # checked by test_lorakit_conversion_loads_in_peft_on_the_original_model[llama-rslora-*].)
    make, kw = CASES["llama"]
    pm = peft.get_peft_model(make(), peft.LoraConfig(**kw, init_lora_weights=init))
    pm.save_pretrained(tmp_path / "init")
    _train_like(pm)
    pm.eval()
    ids = _ids()
    want = _logits(pm, ids)
    pm.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=tmp_path / "init")
    ours = lorakit.load_adapter(make(), tmp_path / "peft")
    torch.testing.assert_close(_logits(ours, ids), want, rtol=1e-4, atol=1e-4)


def test_weight_inits_refuse_bases_they_cannot_change():
    from lorakit.quant import quantize_model

    make, kw = CASES["llama"]
    model = quantize_model(make(), "nf4", compute_dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LorakitError, match=r"module 'model\.layers\.0\.\S+' is a quantized QuantLinear.*loftq"):
        lorakit.inject(model, lorakit.LoraConfig(**kw, init_lora_weights="pissa"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(UnsupportedModuleError, match=r"embed_tokens.*pissa"):
        lorakit.inject(make(), lorakit.LoraConfig(target_modules=["embed_tokens"], init_lora_weights="pissa"))


def test_mixed_targets_leave_the_model_unchanged_when_one_is_refused():
    make, kw = CASES["llama"]
    model = make()
    from lorakit.quant import QuantLinear

    model.model.layers[1].self_attn.v_proj = QuantLinear.from_linear(model.model.layers[1].self_attn.v_proj,
                                                                     compute_dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LorakitError, match=r"layers\.1\.self_attn\.v_proj"):
        lorakit.inject(model, lorakit.LoraConfig(**kw, init_lora_weights="olora"))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_bad_init_values_and_files():
    with pytest.raises(ConfigError, match="pissa_niter_N"):
        lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa_niter_x")
    with pytest.raises(ConfigError, match="lorakit.quant.loftq"):
        lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq"))


def test_conversion_refuses_a_foreign_initial_state(tmp_path):
    make, kw = CASES["llama"]
    other = lorakit.inject(make(), lorakit.LoraConfig(target_modules=["q_proj"], r=4, init_lora_weights="pissa"))
    lorakit.save_adapter(other, tmp_path / "other")
    ours = lorakit.inject(make(), lorakit.LoraConfig(**kw, init_lora_weights="pissa"))
    with pytest.raises(AdapterFileError, match="missing tensor .*v_proj"):
        save_as_lora(ours, tmp_path / "out", tmp_path / "other")
    assert not (tmp_path / "out").exists()
