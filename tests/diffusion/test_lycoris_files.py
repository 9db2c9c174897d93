"""LyCORIS LoHa / LoKr single files on a UNet: round trips, ComfyUI's per-module formulas reproduced
independently, PEFT LoHa/LoKr adapters on a diffusers UNet loaded by lorakit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.diffusion import DiffusionLoraConfig, add_adapter, load_kohya, save_kohya
from lorakit.diffusion.stack import merge_and_unload
from lorakit.errors import AdapterFileError

from .tiny import randomize, sd1_parts, sdxl_parts, te_out, unet_out

pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_round_trip_sd1_and_sdxl(tmp_path, kind):
    for make, sdxl in ((sd1_parts, False), (sdxl_parts, True)):
        parts = make()
        add_adapter(parts, DiffusionLoraConfig(kind=kind, rank=2, alpha=3.0, conv_rank=2, conv_alpha=1.0,
                                               text_encoder=True), "s")
        randomize(parts, "s")
        want, want_te = unet_out(parts["unet"], sdxl), te_out(parts["text_encoder"])
        f = save_kohya(parts, tmp_path / f"{kind}{sdxl}.safetensors", "s")
        keys = set(load_file(f))
        stem = "lora_unet_input_blocks_1_0_in_layers_2" if sdxl else "lora_unet_" + CONV.replace(".", "_")
        if kind == "loha":
            assert {f"{stem}.hada_w1_a", f"{stem}.hada_w2_b", f"{stem}.alpha"} <= keys
        else:
            assert f"{stem}.alpha" in keys and any(k.startswith(f"{stem}.lokr_w1") for k in keys)
        back = make()
        load_kohya(back, f, "s")
        assert torch.allclose(unet_out(back["unet"], sdxl), want, atol=1e-5, rtol=0)
        assert torch.allclose(te_out(back["text_encoder"]), want_te, atol=1e-5, rtol=0)


def _merged_weight(parts, f, path):
    load_kohya(parts, f, "x")
    return merge_and_unload(parts)["unet"].get_submodule(path).weight.detach()


def test_comfyui_formulas_loha_and_lokr(tmp_path):
    base = sd1_parts()["unet"]
    wq, wc = base.get_submodule(Q).weight.detach(), base.get_submodule(CONV).weight.detach()
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    kq, kc = "lora_unet_" + Q.replace(".", "_"), "lora_unet_" + CONV.replace(".", "_")
    out_q, in_q = wq.shape
    out_c, in_c = wc.shape[:2]

    # LoHa: ΔW = α/r · (w1a w1b) ⊙ (w2a w2b), conv flattened to (out, in·k·k)
    loha = {f"{kq}.hada_w1_a": rnd(out_q, 3), f"{kq}.hada_w1_b": rnd(3, in_q), f"{kq}.hada_w2_a": rnd(out_q, 3),
            f"{kq}.hada_w2_b": rnd(3, in_q), f"{kq}.alpha": torch.tensor(2.0),
            f"{kc}.hada_w1_a": rnd(out_c, 2), f"{kc}.hada_w1_b": rnd(2, in_c * 9), f"{kc}.hada_w2_a": rnd(out_c, 2),
            f"{kc}.hada_w2_b": rnd(2, in_c * 9), f"{kc}.alpha": torch.tensor(5.0)}
    save_file(loha, str(tmp_path / "loha.safetensors"))
    for k, w, path, alpha, r in ((kq, wq, Q, 2.0, 3), (kc, wc, CONV, 5.0, 2)):
        d = (loha[f"{k}.hada_w1_a"] @ loha[f"{k}.hada_w1_b"]) * (loha[f"{k}.hada_w2_a"] @ loha[f"{k}.hada_w2_b"])
        got = _merged_weight(sd1_parts(), tmp_path / "loha.safetensors", path)
        assert torch.allclose(got, w + alpha / r * d.reshape(w.shape), atol=1e-4)

    # LoKr, to_q (64×64): full w1 (8×8) and full w2 (8×8) with alpha 7 → scale 1 (α ignored);
    # conv (32 out, 32 in, 3×3): w1 (4×2), w2 = w2_a (8×2) · w2_b (2, 16·9), alpha 3 → scale 3/2
    lokr = {f"{kq}.lokr_w1": rnd(8, 8), f"{kq}.lokr_w2": rnd(out_q // 8, in_q // 8), f"{kq}.alpha": torch.tensor(7.0),
            f"{kc}.lokr_w1": rnd(4, 2), f"{kc}.lokr_w2_a": rnd(8, 2), f"{kc}.lokr_w2_b": rnd(2, (in_c // 2) * 9),
            f"{kc}.alpha": torch.tensor(3.0)}
    save_file(lokr, str(tmp_path / "lokr.safetensors"))
    dq = torch.einsum("ac,bd->abcd", lokr[f"{kq}.lokr_w1"], lokr[f"{kq}.lokr_w2"]).reshape(out_q, in_q)
    got = _merged_weight(sd1_parts(), tmp_path / "lokr.safetensors", Q)
    assert torch.allclose(got, wq + dq, atol=1e-4)
    w2 = (lokr[f"{kc}.lokr_w2_a"] @ lokr[f"{kc}.lokr_w2_b"]).reshape(8, in_c // 2, 3, 3)
    dc = torch.einsum("ac,bdhw->abcdhw", lokr[f"{kc}.lokr_w1"], w2).reshape(out_c, in_c, 3, 3)
    got = _merged_weight(sd1_parts(), tmp_path / "lokr.safetensors", CONV)
    assert torch.allclose(got, wc + 1.5 * dc, atol=1e-4)


@pytest.mark.parametrize("cfg", [peft.LoHaConfig(r=2, alpha=4, target_modules=["to_q", "to_v", "conv1"], init_weights=False),
                                 peft.LoKrConfig(r=2, alpha=4, target_modules=["to_k", "proj_in", "conv2"],
                                                 init_weights=False, decompose_both=True)])
def test_peft_loha_lokr_on_unet_loads_in_lorakit(tmp_path, cfg):
    ref = peft.get_peft_model(sd1_parts()["unet"], cfg)
    want = unet_out(ref.base_model.model)
    ref.save_pretrained(tmp_path)
    unet = lorakit.load_adapter(sd1_parts()["unet"], tmp_path, "p")
    assert torch.allclose(unet_out(unet), want, atol=1e-5, rtol=0)


def test_mixed_kinds_and_unknown_family_are_refused(tmp_path):
    parts = sd1_parts()
    add_adapter(parts, DiffusionLoraConfig(kind="loha", rank=2), "s")
    t = load_file(save_kohya(parts, tmp_path / "a.safetensors", "s"))
    t["lora_unet_" + CONV.replace(".", "_") + ".lora_down.weight"] = torch.zeros(2, 32, 3, 3)
    t["lora_unet_" + CONV.replace(".", "_") + ".lora_up.weight"] = torch.zeros(32, 2, 1, 1)
    save_file(t, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(AdapterFileError, match=r"mixed\.safetensors: mixes adapter kinds \['loha', 'lora'\]"):
        load_kohya(sd1_parts(), tmp_path / "mixed.safetensors")
    save_file({"lora_unet_" + CONV.replace(".", "_") + ".oft_blocks": torch.zeros(2)}, str(tmp_path / "oft.safetensors"))
    with pytest.raises(AdapterFileError, match=r"oft\.safetensors: module .*oft_blocks.*OFT"):
        load_kohya(sd1_parts(), tmp_path / "oft.safetensors")
