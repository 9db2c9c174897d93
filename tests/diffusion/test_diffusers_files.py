"""diffusers / PEFT format (pytorch_lora_weights.safetensors): lorakit → diffusers and back, same outputs."""

from __future__ import annotations

import pytest
import torch

from lorakit.diffusion import DiffusionLoraConfig, add_adapter
from lorakit.diffusion.peft_files import load_diffusers, save_diffusers
from lorakit.errors import AdapterFileError

from .tiny import randomize, sd1_parts, te_out, unet_out

pytest.importorskip("diffusers")
pytest.importorskip("peft")


@pytest.mark.parametrize("fold_alpha", [False, True])
def test_diffusers_reads_lorakit_file(tmp_path, fold_alpha):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as SD

    parts = sd1_parts()
    add_adapter(parts, DiffusionLoraConfig(rank=4, alpha=1.0, conv_rank=2, conv_alpha=3.0, text_encoder=True), "s")
    randomize(parts, "s")
    want, want_te = unet_out(parts["unet"]), te_out(parts["text_encoder"])
    f = save_diffusers(parts, tmp_path, "s", fold_alpha=fold_alpha)
    assert f.name == "pytorch_lora_weights.safetensors"

    fresh = sd1_parts()
    sd, alphas, meta = SD.lora_state_dict(str(tmp_path), return_lora_metadata=True)
    if fold_alpha:
        meta = None  # a reader that ignores the metadata gets the same ΔW from folded weights
    SD.load_lora_into_unet(sd, alphas, fresh["unet"], metadata=meta)
    SD.load_lora_into_text_encoder(sd, alphas, fresh["text_encoder"], prefix="text_encoder", metadata=meta)
    assert torch.allclose(unet_out(fresh["unet"]), want, atol=1e-5, rtol=0)
    assert torch.allclose(te_out(fresh["text_encoder"]), want_te, atol=1e-5, rtol=0)

    back = sd1_parts()
    load_diffusers(back, tmp_path, "s")
    assert torch.allclose(unet_out(back["unet"]), want, atol=1e-5, rtol=0)
    assert torch.allclose(te_out(back["text_encoder"]), want_te, atol=1e-5, rtol=0)


def test_lorakit_reads_peft_unet_adapter_saved_by_diffusers(tmp_path):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as SD
    from peft import LoraConfig, get_peft_model_state_dict

    ref = sd1_parts()["unet"]
    ref.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_v", "conv1"]))
    want = unet_out(ref)
    SD.write_lora_layers({f"unet.{k}": v for k, v in get_peft_model_state_dict(ref).items()}, str(tmp_path),
                         True, None, None, True, lora_adapter_metadata={"unet.r": 4, "unet.lora_alpha": 8,
                                                                        "unet.target_modules": ["to_q", "to_v", "conv1"]})
    parts = sd1_parts()
    load_diffusers(parts, tmp_path, "p")
    assert torch.allclose(unet_out(parts["unet"]), want, atol=1e-5, rtol=0)


def test_wrong_component_is_reported(tmp_path):
    from safetensors.torch import save_file

    save_file({"transformer.x.lora_A.weight": torch.zeros(2, 4)}, str(tmp_path / "pytorch_lora_weights.safetensors"))
    with pytest.raises(AdapterFileError, match="component 'transformer' is not in this pipeline"):
        load_diffusers(sd1_parts(), tmp_path)
