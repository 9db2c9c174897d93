"""Issue 10.1: a wrapped layer answers the attribute reads models make of the layer it replaces
(T5 reads ``wo.weight.dtype``, ViT/CLIP the patch conv's weight, Whisper ``conv1.stride``)."""

import pytest
import torch
from peft_models import MODELS, assert_close, lorakit_config, output, peft, peft_config, perturb
from torch import nn

import lorakit
from lorakit.adapter_kinds.lora import LoraAdapter
from lorakit.layers.host import LoraLayer
from lorakit.layers.kinds import kind_of

# (model, target_modules): each target is read by its model's forward (or its all-linear set is).
CASES = {
    "t5-wo": ("t5", ["wo"]),
    "t5-all-linear": ("t5", "all-linear"),
    "vit-patch-conv": ("vit", ["projection", "q_proj"]),
    "clip-patch-conv": ("clip", ["patch_embedding", "q_proj"]),
    "whisper": ("whisper", ["q_proj", "fc1"]),  # PEFT 0.21 itself fails on conv1 (no .stride): see below
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lorakit_saved_loads_in_peft(case, tmp_path):
    name, targets = CASES[case]
    make, inputs = MODELS[name]
    ours = lorakit.inject(make(), lorakit_config(target_modules=targets))
    perturb(ours)
    want = output(ours, inputs())
    assert not torch.allclose(want, output(make(), inputs()))  # the adapter matters
    lorakit.save_adapter(ours, tmp_path / "k")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval()
    assert_close(output(theirs, inputs()), want)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_loads_in_lorakit(case, tmp_path):
    name, targets = CASES[case]
    make, inputs = MODELS[name]
    theirs = peft.get_peft_model(make(), peft_config(target_modules=targets)).eval()
    want = output(theirs, inputs())
    theirs.save_pretrained(tmp_path / "p")
    ours = lorakit.load_adapter(make(), tmp_path / "p")
    assert_close(output(ours, inputs()), want)


def test_whisper_conv_matches_naive_weight_update():
    """Whisper reads ``conv1.stride``; PEFT 0.21's own conv wrapper fails there (its quirk), so the
    reference is the naive formula: the base model with W += (α/r)·B·A written into the conv weights."""
    make, inputs = MODELS["whisper"]
    ours = lorakit.inject(make(), lorakit_config(target_modules=["conv1", "conv2"]))
    perturb(ours)
    ref = make()
    with torch.no_grad():
        for name in ("conv1", "conv2"):
            host = getattr(ours.model.encoder, name)
            a, b = host.lora["default"].lora_A, host.lora["default"].lora_B  # (r, in, k), (out, r, 1)
            delta = (b.flatten(1) @ a.flatten(1)) * (8 / 4)
            getattr(ref.model.encoder, name).weight += delta.reshape(host.weight.shape)
    assert_close(output(ours, inputs()), output(ref, inputs()))


def test_state_dict_keys_are_peft_base_keys():
    """Forwarding attributes adds no parameter: the base keys are PEFT's ``<path>.base_layer.*``."""
    make, _ = MODELS["whisper"]
    ours = lorakit.inject(make(), lorakit_config(target_modules=["conv1", "q_proj"]))
    theirs = peft.get_peft_model(make(), peft_config(target_modules=["conv1", "q_proj"])).base_model.model
    base = lambda sd: {k for k in sd if ".lora" not in k}  # noqa: E731 - adapter keys are spelled differently
    assert base(ours.state_dict()) == base(theirs.state_dict())
    assert ours.model.encoder.conv1.stride == (1,) and ours.model.encoder.conv1.weight.dtype == torch.float32


@pytest.mark.parametrize("base", [
    nn.Linear(6, 5), nn.Conv2d(3, 4, 3, stride=2), nn.Conv1d(3, 4, 3, padding=1), nn.Embedding(10, 6),
])
def test_host_answers_base_attributes(base):
    host = LoraLayer(base, kind_of(base))
    host.add("a", LoraAdapter(host.kind.geometry(base, 2), r=2, alpha=2, scaling=1.0, dropout=0.0))
    for attr in ("weight", "bias", "in_features", "out_features", "stride", "padding", "kernel_size",
                 "in_channels", "num_embeddings", "embedding_dim", "padding_idx"):
        if hasattr(base, attr):
            assert getattr(host, attr) is getattr(base, attr), attr
    assert [n for n, _ in host.named_parameters()][:1] == ["base_layer.weight"]
    with pytest.raises(AttributeError):
        host.no_such_attribute  # noqa: B018 - unknown names still fail
    with pytest.raises(AttributeError):
        host._private_of_base  # noqa: B018 - private names are never forwarded


def test_host_assignment_reaches_the_base():
    """``host.weight = p`` (transformers re-tying embeddings) must replace the base's weight, not add a
    second parameter to the host."""
    base = nn.Linear(4, 3)
    host = LoraLayer(base, kind_of(base))
    p = nn.Parameter(torch.ones(3, 4))
    host.weight = p
    assert base.weight is p and "weight" not in host._parameters
    host.train(False)  # the host's own attributes stay its own
    assert host.training is False


def test_quantized_base_answers_its_attributes():
    from lorakit.quant import quantize_model

    model = quantize_model(nn.Sequential(nn.Linear(64, 32)), "nf4")
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["0"], r=2))
    host = model[0]
    assert isinstance(host, LoraLayer)
    assert (host.in_features, host.out_features) == (64, 32)
    assert host.quant_type == "nf4"
