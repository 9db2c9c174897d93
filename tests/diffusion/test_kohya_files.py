"""kohya / LyCORIS single-file LoRAs: lorakit's files load in diffusers with the same outputs, files from
diffusers' own kohya converter load in lorakit, ComfyUI's α/rank rule reproduced independently."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.diffusion import DiffusionLoraConfig, add_adapter, load_kohya, save_kohya
from lorakit.errors import AdapterFileError
from lorakit.state import lora_layers

from .tiny import randomize, sd1_parts, sdxl_parts, te_out, tiny_pipeline, unet_out

pytest.importorskip("diffusers")
pytest.importorskip("peft")


def _adapted(parts, **kw):
    add_adapter(parts, DiffusionLoraConfig(**kw), "style")
    randomize(parts, "style")
    return parts


def test_sd1_kohya_file_loads_in_diffusers_with_same_outputs(tmp_path):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as SD

    parts = _adapted(sd1_parts(), rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, text_encoder=True)
    want_unet, want_te = unet_out(parts["unet"]), te_out(parts["text_encoder"])
    f = save_kohya(parts, tmp_path / "style.safetensors", "style")
    keys = load_file(f)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys  # LoCon
    assert keys["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[-2:] == (3, 3)
    assert keys["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape[-2:] == (1, 1)
    assert float(keys["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 1.0  # true per-module alpha
    assert float(keys["lora_unet_down_blocks_1_attentions_0_proj_in.alpha"]) == 2.0
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys

    fresh = sd1_parts()
    base_unet = unet_out(fresh["unet"])
    sd, alphas = SD.lora_state_dict(str(f))
    SD.load_lora_into_unet(sd, alphas, fresh["unet"])
    SD.load_lora_into_text_encoder(sd, alphas, fresh["text_encoder"], prefix="text_encoder")
    got_unet, got_te = unet_out(fresh["unet"]), te_out(fresh["text_encoder"])
    assert (got_unet - base_unet).abs().max() > 1e-3  # the LoRA does something
    assert torch.allclose(got_unet, want_unet, atol=1e-5, rtol=0)
    assert torch.allclose(got_te, want_te, atol=1e-5, rtol=0)


def test_pipeline_load_lora_weights_of_a_lorakit_file(tmp_path):
    """The whole diffusers path, StableDiffusionPipeline.load_lora_weights, on a file lorakit wrote from
    (and into) a pipeline."""
    pipe = tiny_pipeline(sd1_parts())
    add_adapter(pipe, DiffusionLoraConfig(rank=2, alpha=3.0, conv_rank=2, text_encoder=True), "style")
    randomize({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, "style")
    want, want_te = unet_out(pipe.unet), te_out(pipe.text_encoder)
    f = save_kohya(pipe, tmp_path / "p.safetensors", "style")
    theirs = tiny_pipeline(sd1_parts())
    theirs.load_lora_weights(str(f), adapter_name="style")
    assert torch.allclose(unet_out(theirs.unet), want, atol=1e-5, rtol=0)
    assert torch.allclose(te_out(theirs.text_encoder), want_te, atol=1e-5, rtol=0)


def test_sdxl_kohya_file_uses_sgm_names_and_loads_in_diffusers(tmp_path):
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as XL

    parts = _adapted(sdxl_parts(), rank=4, alpha=8.0, conv_rank=2, conv_alpha=2.0, text_encoder=True)
    want = unet_out(parts["unet"], sdxl=True)
    want_te2 = te_out(parts["text_encoder_2"])
    f = save_kohya(parts, tmp_path / "xl.safetensors", "style")
    keys = set(load_file(f))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_down.weight" in keys
    assert "lora_unet_middle_block_1_proj_in.lora_up.weight" in keys
    assert "lora_unet_output_blocks_2_2_conv.lora_down.weight" in keys  # up_blocks.0.upsamplers.0.conv
    assert "lora_unet_input_blocks_3_0_op.alpha" in keys  # down_blocks.0.downsamplers.0.conv
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in keys  # resnet conv1
    assert any(k.startswith("lora_te1_text_model_encoder_layers_1_mlp_fc2") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_out_proj") for k in keys)
    assert not any("down_blocks" in k for k in keys)

    fresh = sdxl_parts()
    sd, alphas = XL.lora_state_dict(str(f), unet_config=fresh["unet"].config)
    XL.load_lora_into_unet(sd, alphas, fresh["unet"])
    te2 = {k: v for k, v in sd.items() if k.startswith("text_encoder_2.")}
    XL.load_lora_into_text_encoder(te2, alphas, fresh["text_encoder_2"], prefix="text_encoder_2")
    assert torch.allclose(unet_out(fresh["unet"], sdxl=True), want, atol=1e-5, rtol=0)
    assert torch.allclose(te_out(fresh["text_encoder_2"]), want_te2, atol=1e-5, rtol=0)

    # and back into lorakit from the same file
    again = sdxl_parts()
    load_kohya(again, f, "style")
    assert torch.allclose(unet_out(again["unet"], sdxl=True), want, atol=1e-5, rtol=0)


def test_file_from_diffusers_kohya_converter_loads_in_lorakit(tmp_path):
    """PEFT LoRA on the UNet → diffusers' convert_state_dict_to_kohya (alpha = rank) → lorakit."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict

    ref = sd1_parts()["unet"]
    ref.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                               target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]))
    want = unet_out(ref)
    sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(ref).items()}
    f = tmp_path / "conv.safetensors"
    save_file(convert_state_dict_to_kohya(sd), str(f))

    parts = sd1_parts()
    load_kohya(parts, f, "conv")
    assert torch.allclose(unet_out(parts["unet"]), want, atol=1e-5, rtol=0)


def test_comfyui_scaling_alpha_over_rank_of_lora_down(tmp_path):
    """ComfyUI: W' = W + strength · (alpha / lora_down.shape[0]) · up @ down (flattened for convs)."""
    parts = sd1_parts()
    base = {n: p.detach().clone() for n, p in parts["unet"].named_parameters()}
    path_q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    path_c = "down_blocks.0.resnets.0.conv1"
    g = torch.Generator().manual_seed(0)
    wq, wc = base[path_q + ".weight"], base[path_c + ".weight"]
    sd = {
        "lora_unet_" + path_q.replace(".", "_") + ".lora_down.weight": torch.randn(3, wq.shape[1], generator=g),
        "lora_unet_" + path_q.replace(".", "_") + ".lora_up.weight": torch.randn(wq.shape[0], 3, generator=g),
        "lora_unet_" + path_q.replace(".", "_") + ".alpha": torch.tensor(1.5),
        "lora_unet_" + path_c.replace(".", "_") + ".lora_down.weight": torch.randn(2, wc.shape[1], 3, 3, generator=g),
        "lora_unet_" + path_c.replace(".", "_") + ".lora_up.weight": torch.randn(wc.shape[0], 2, 1, 1, generator=g),
        "lora_unet_" + path_c.replace(".", "_") + ".alpha": torch.tensor(5.0),
    }
    f = tmp_path / "c.safetensors"
    save_file(sd, str(f))
    load_kohya(parts, f, "c")
    from lorakit import merge_and_unload

    merged = merge_and_unload(parts["unet"])
    for path, w in ((path_q, wq), (path_c, wc)):
        k = "lora_unet_" + path.replace(".", "_")
        down, up, alpha = sd[k + ".lora_down.weight"], sd[k + ".lora_up.weight"], float(sd[k + ".alpha"])
        expect = w + (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        got = merged.get_submodule(path).weight
        assert torch.allclose(got, expect, atol=1e-5)


def test_foreign_base_and_bad_files_raise_naming_file(tmp_path):
    xl = _adapted(sdxl_parts(), rank=2, alpha=2.0, text_encoder=True)
    f = save_kohya(xl, tmp_path / "xl.safetensors", "style")
    sd1 = sd1_parts()
    before = {n: p.clone() for n, p in sd1["unet"].state_dict().items()}
    with pytest.raises(AdapterFileError, match=r"xl\.safetensors.*SDXL"):
        load_kohya(sd1, f, "x")
    assert not list(lora_layers(sd1["unet"])) and not list(lora_layers(sd1["text_encoder"]))
    assert all(torch.equal(before[n], p) for n, p in sd1["unet"].state_dict().items())

    tensors = load_file(f)
    k = next(k for k in tensors if k.endswith(".lora_up.weight"))
    tensors[k.replace(".lora_up.weight", ".hada_t1")] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "odd.safetensors"))
    with pytest.raises(AdapterFileError, match=r"odd\.safetensors.*hada_t1.*Tucker"):
        load_kohya(sdxl_parts(), tmp_path / "odd.safetensors", "x")

    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(AdapterFileError, match=r"junk\.safetensors.*cannot be read"):
        load_kohya(sd1, tmp_path / "junk.safetensors")
