"""Several weighted LoRAs at once (style + character), against diffusers' set_adapters and a formula;
merging into the pipeline's weights and unmerging."""

from __future__ import annotations

import pytest
import torch

from lorakit.diffusion import DiffusionLoraConfig, add_adapter, load_kohya, save_kohya
from lorakit.diffusion.stack import merge, merge_and_unload, set_adapters, unmerge
from lorakit.errors import AdapterStateError, ConfigError

from .tiny import randomize, sd1_parts, unet_out

pytest.importorskip("diffusers")
pytest.importorskip("peft")


def _two_files(tmp_path):
    files = {}
    for i, (name, kw) in enumerate({"style": dict(rank=4, alpha=2.0), "char": dict(rank=2, alpha=4.0,
                                                                                     conv_rank=2)}.items()):
        parts = sd1_parts()
        add_adapter(parts, DiffusionLoraConfig(**kw), name)
        randomize(parts, name, seed=10 + i)
        files[name] = save_kohya(parts, tmp_path / f"{name}.safetensors", name)
    return files


def test_weighted_stack_matches_diffusers_set_adapters(tmp_path):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as SD

    files = _two_files(tmp_path)
    ref = sd1_parts()["unet"]
    for name, f in files.items():
        sd, alphas = SD.lora_state_dict(str(f))
        SD.load_lora_into_unet(sd, alphas, ref, adapter_name=name)
    ref.set_adapters(["style", "char"], weights=[0.7, -0.4])
    want = unet_out(ref)

    parts = sd1_parts()
    for name, f in files.items():
        load_kohya(parts, f, name)
    set_adapters(parts, ["style", "char"], [0.7, -0.4])
    got = unet_out(parts["unet"])
    assert torch.allclose(got, want, atol=1e-5, rtol=0)

    set_adapters(parts, "style", 1.0)  # weights are not cumulative
    ref.set_adapters(["style"], weights=[1.0])
    assert torch.allclose(unet_out(parts["unet"]), unet_out(ref), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="2 names but 1 weights"):
        set_adapters(parts, ["style", "char"], [0.5])


def test_merge_unmerge_and_unload_pipeline(tmp_path):
    files = _two_files(tmp_path)
    parts = sd1_parts()
    base_weights = {k: v.clone() for k, v in parts["unet"].state_dict().items()}
    base_out = unet_out(parts["unet"])
    for name, f in files.items():
        load_kohya(parts, f, name)
    set_adapters(parts, ["style", "char"], [0.5, 1.5])
    live = unet_out(parts["unet"])
    merge(parts)
    merge(parts)  # idempotent
    assert torch.allclose(unet_out(parts["unet"]), live, atol=1e-5)
    with pytest.raises(AdapterStateError, match="unmerge"):
        set_adapters(parts, ["style"], [1.0])
    unmerge(parts)
    assert torch.allclose(unet_out(parts["unet"]), live, atol=1e-5)  # unmerged, still active
    set_adapters(parts, ["style", "char"], [0.0, 0.0])
    assert torch.allclose(unet_out(parts["unet"]), base_out, atol=1e-6)
    set_adapters(parts, ["style", "char"], [0.5, 1.5])
    plain = merge_and_unload(parts)
    assert torch.allclose(unet_out(plain["unet"]), live, atol=1e-5)
    sd = plain["unet"].state_dict()
    assert sd.keys() == base_weights.keys()  # plain diffusers modules again
