"""LoRA adapters on grouped convolutions (groups > 1, depthwise) move both ways between PEFT 0.21 and
lorakit: PEFT's file loads in lorakit and the outputs agree (1e-5), lorakit's file loads in PEFT and the
outputs agree, and both hold the same keys and shapes (A (r, in, *k), B (out, r/groups, 1…)). PEFT is
the independent reference; the maths against a naive formula is in tests/layers/test_grouped_conv.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft_archs import ARCHS
from peft_models import assert_close, lorakit_config, output, peft, peft_config, perturb
from torch import nn

import lorakit
from lorakit.errors import LorakitError, UnsupportedModuleError
from lorakit.layers.host import LoraLayer

# (dims, in, out, kernel, groups, r, conv kwargs) — no dilation: PEFT 0.21's lora_A drops it and fails
CASES = [
    (1, 8, 8, 3, 2, 4, dict(padding=1)),
    (1, 6, 6, 5, 6, 6, dict(padding=2, stride=2, bias=False)),  # depthwise
    (2, 8, 12, 3, 4, 8, dict(stride=2, padding=1)),
    (2, 6, 6, (3, 5), 6, 12, dict(padding=(1, 2), bias=False)),  # depthwise, r = 2·groups
    (2, 4, 8, 3, 4, 4, dict(padding="same")),  # depthwise with channel multiplier 2
    (2, 8, 8, 1, 2, 2, dict()),  # 1×1 grouped
    (3, 4, 8, 3, 2, 2, dict(stride=(1, 2, 1), padding=1)),
]
IDS = [f"conv{c[0]}d-g{c[4]}-r{c[5]}-{i}" for i, c in enumerate(CASES)]
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class Net(nn.Module):
    """A grouped conv between two plain ones (both adapted too, so the file mixes kinds)."""

    def __init__(self, dims, cin, cout, k, groups, kw):
        super().__init__()
        conv = CONV[dims]
        self.stem = conv(3, cin, 1)
        self.grouped = conv(cin, cout, k, groups=groups, **kw)
        self.head = conv(cout, 2, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.grouped(self.stem(x))))


def _make(case):
    dims, cin, cout, k, groups, _, kw = case

    def make():
        torch.manual_seed(0)
        return Net(dims, cin, cout, k, groups, kw).eval()
    return make


def _x(dims):
    size = {1: (2, 3, 13), 2: (2, 3, 9, 8), 3: (2, 3, 5, 6, 7)}[dims]
    return torch.randn(size, generator=torch.Generator().manual_seed(3))


def _peft_model(model, **kw):
    with warnings.catch_warnings():  # PEFT: "LoRA adapter added to ConvNd layer with groups > 1 ..."
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft_config(**kw))


def _peft_load(model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(model, path)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peft_file_loads_in_lorakit(case, tmp_path):
    make, x, r = _make(case), _x(case[0]), case[5]
    theirs = _peft_model(make(), r=r, target_modules=["stem", "grouped", "head"])
    perturb(theirs)
    want = theirs(x).detach()
    theirs.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(make(), tmp_path)
    assert isinstance(ours.grouped, LoraLayer) and ours.grouped.kind.grouped
    with torch.no_grad():
        got = ours(x)
        assert not torch.allclose(got, make()(x), atol=1e-3)  # the adapter matters
    assert_close(got, want)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lorakit_file_loads_in_peft(case, tmp_path):
    make, x, r = _make(case), _x(case[0]), case[5]
    ours = lorakit.inject(make(), lorakit_config(r=r, target_modules=["stem", "grouped", "head"]))
    perturb(ours)
    with torch.no_grad():
        want = ours(x)
    lorakit.save_adapter(ours, tmp_path)
    theirs = _peft_load(make(), tmp_path)
    with torch.no_grad():
        assert_close(theirs(x), want)
    # the same tensors under the same keys and shapes as PEFT's own adapter state
    ref = {k: v.shape for k, v in _peft_model(make(), r=r, target_modules=["stem", "grouped", "head"])
           .state_dict().items() if "lora_" in k}
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k.replace(".default", ""): v for k, v in ref.items()}


def test_gradients_match_peft():
    case = CASES[3]
    make, x, r = _make(case), _x(case[0]), case[5]
    theirs = _peft_model(make(), r=r, target_modules=["grouped"])
    perturb(theirs)
    ours = lorakit.inject(make(), lorakit_config(r=r, target_modules=["grouped"]))
    layer = theirs.base_model.model.grouped
    with torch.no_grad():
        ours.grouped.lora["default"].lora_A.copy_(layer.lora_A["default"].weight)
        ours.grouped.lora["default"].lora_B.copy_(layer.lora_B["default"].weight)
    theirs(x).square().sum().backward()
    ours(x).square().sum().backward()
    ad = ours.grouped.lora["default"]
    assert_close(ad.lora_A.grad, layer.lora_A["default"].weight.grad)
    assert_close(ad.lora_B.grad, layer.lora_B["default"].weight.grad)


def test_peft_dora_file_on_a_grouped_conv_is_refused_naming_the_module(tmp_path):
    make, r = _make(CASES[2]), CASES[2][5]
    theirs = _peft_model(make(), r=r, target_modules=["grouped"], use_dora=True)
    theirs.save_pretrained(tmp_path)
    model = make()
    with pytest.raises(UnsupportedModuleError, match=r"'grouped'.*DoRA is not supported on grouped.*use_dora=False"):
        lorakit.load_adapter(model, tmp_path)
    assert type(model.grouped) is nn.Conv2d and lorakit.list_adapters(model) == []


def test_file_for_other_groups_is_refused(tmp_path):
    # saved on groups=2 with r=2; the model's conv has groups=4: r is no multiple of 4
    torch.manual_seed(0)
    src = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2))
    lorakit.save_adapter(lorakit.inject(src, lorakit_config(r=2, target_modules=["0"])), tmp_path)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=4))
    with pytest.raises(LorakitError, match=r"module '0'.*groups=4.*multiple of 4"):
        lorakit.load_adapter(model, tmp_path)
    assert type(model[0]) is nn.Conv2d


# Real transformers models built tiny from configs: ConvNeXt's depthwise 7×7 dwconv (groups = 16 and 32
# in the two stages, so r = 32), wav2vec2's positional conv embedding (Conv1d, groups 4, weight-normed).
REAL = {"convnext": (["dwconv"], 32), "wav2vec2-cls": (["pos_conv_embed.conv"], 4)}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_models_both_ways(name, tmp_path):
    make, inputs = ARCHS[name]
    targets, r = REAL[name]
    theirs = _peft_model(make(), r=r, target_modules=targets)
    perturb(theirs)
    theirs.eval()
    want = output(theirs, inputs())
    theirs.save_pretrained(tmp_path / "peft")
    ours = lorakit.load_adapter(make(), tmp_path / "peft")
    assert sum(isinstance(m, LoraLayer) and m.kind.grouped for m in ours.modules()) >= 1
    got = output(ours, inputs())
    assert not torch.allclose(got, output(make(), inputs()), atol=1e-4)
    assert_close(got, want)
    lorakit.save_adapter(ours, tmp_path / "ours")
    back = _peft_load(make(), tmp_path / "ours")
    assert_close(output(back, inputs()), want)
