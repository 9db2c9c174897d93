"""LoHa / LoKr through lorakit's one inject and one adapter-file path, against PEFT models and files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.adapter_kinds.lycoris_config import LoHaConfig, LoKrConfig
from lorakit.errors import ConfigError, UnsupportedModuleError

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.lin = nn.Linear(8, 12)
        self.out = nn.Linear(12, 6)
        self.emb = nn.Embedding(5, 8)

    def forward(self, img):
        h = self.conv(img).mean((2, 3))
        return self.out(torch.relu(self.lin(h)))


IMG = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
CASES = [
    (LoHaConfig, peft.LoHaConfig, dict(r=2, alpha=3)),
    (LoKrConfig, peft.LoKrConfig, dict(r=1, alpha=3)),
    (LoKrConfig, peft.LoKrConfig, dict(r=2, alpha=2, decompose_both=True, decompose_factor=2)),
    (LoKrConfig, peft.LoKrConfig, dict(r=8, alpha=5)),  # both factors full
]


@pytest.mark.parametrize("ours,theirs,kw", CASES)
def test_peft_file_loads_in_lorakit_and_back(tmp_path, ours, theirs, kw):
    ref = peft.get_peft_model(Net(), theirs(target_modules=["conv", "lin", "out"], init_weights=False, **kw))
    want = ref(IMG)
    ref.save_pretrained(tmp_path / "peft")
    model = lorakit.load_adapter(Net(), tmp_path / "peft", "x")
    assert torch.allclose(model(IMG), want, atol=1e-5)

    lorakit.save_adapter(model, tmp_path / "ours", "x")
    back = peft.PeftModel.from_pretrained(Net(), tmp_path / "ours")
    assert torch.allclose(back(IMG), want, atol=1e-5)

    base = Net()(IMG)
    lorakit.merge(model)
    lorakit.merge(model)
    assert torch.allclose(model(IMG), want, atol=1e-5)
    lorakit.unmerge(model)
    with lorakit.disabled(model):
        assert torch.allclose(model(IMG), base, atol=1e-6)
    plain = lorakit.merge_and_unload(model)
    assert type(plain.lin) is nn.Linear and torch.allclose(plain(IMG), want, atol=1e-5)


def test_inject_trains_only_the_factors_and_starts_at_zero():
    model = lorakit.inject(Net(), LoHaConfig(r=2, alpha=2, target_modules=["conv", "lin"]))
    base = Net()(IMG)
    assert torch.allclose(model(IMG), base, atol=1e-6)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".hada_w" in n for n in names)
    model(IMG).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_lycoris_scale_rule_written_so_peft_reproduces(tmp_path):
    model = lorakit.inject(Net(), LoKrConfig(r=8, alpha=4, target_modules=["lin"], init_weights=False,
                                             scale_rule="lycoris"))
    assert model.lin.lora["default"].scaling == 1.0  # both factors full: s = 1, not α/r
    want = model(IMG)
    lorakit.save_adapter(model, tmp_path / "a")
    assert torch.allclose(peft.PeftModel.from_pretrained(Net(), tmp_path / "a")(IMG), want, atol=1e-5)


def test_bad_configs_and_targets():
    with pytest.raises(ConfigError, match="use_effective_conv2d"):
        LoHaConfig(target_modules=["lin"], use_effective_conv2d=True)
    with pytest.raises(ConfigError, match="rank_dropout"):
        LoKrConfig(target_modules=["lin"], rank_dropout=0.1)
    with pytest.raises(ConfigError, match="decompose_factor"):
        LoKrConfig(target_modules=["lin"], decompose_factor=0)
    model = Net()
    with pytest.raises(UnsupportedModuleError, match="'emb'.*nn.Linear and nn.Conv2d"):
        lorakit.inject(model, LoHaConfig(target_modules=["emb"]))
    assert not any(".hada_" in n for n, _ in model.named_parameters())
