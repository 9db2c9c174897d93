"""LoRA+ parameter groups (Hayou et al. 2024) against a naive by-name expectation and PEFT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import ConfigError
from lorakit.variants.loraplus import DEFAULT_EMBEDDING_LR, create_loraplus_optimizer, loraplus_param_groups


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.fc2(self.fc1(self.emb(x)))))


def injected(**kw):
    torch.manual_seed(0)
    cfg = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "fc1", "fc2"], bias="lora_only",
                             modules_to_save=["head"], **kw)
    return lorakit.inject(Net(), cfg)


def naive_lr(name: str, p, lr, ratio, emb_lr) -> tuple[float, float]:
    """What the paper and PEFT prescribe, decided from the parameter's name alone."""
    if name.startswith("emb.") and ".lora." in name:
        return emb_lr, 0.1
    if name.endswith("lora_B"):
        return lr * ratio, 0.1
    if p.ndim == 1:
        return lr * ratio, 0.0
    return lr, 0.1  # lora_A and full copies (head)


def test_groups_match_the_naive_expectation():
    model = injected()
    groups = loraplus_param_groups(model, lr=1e-3, ratio=16, embedding_lr=5e-5, weight_decay=0.1)
    got = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(got) == len(trainable)  # every trainable tensor exactly once
    for name, p in trainable:
        assert got[id(p)] == pytest.approx(naive_lr(name, p, 1e-3, 16, 5e-5)), name
    assert {g["name"] for g in groups} == {"lora_A", "lora_B", "lora_B_1d", "embedding", "other"}


def test_defaults_and_optimizer():
    model = injected()
    opt = create_loraplus_optimizer(model, lr=2e-4, betas=(0.8, 0.9))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.8, 0.9)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["lora_B"] == pytest.approx(16 * lrs["lora_A"]) and lrs["embedding"] == DEFAULT_EMBEDDING_LR
    sgd = create_loraplus_optimizer(model, torch.optim.SGD, lr=0.1, ratio=4)
    assert {g["name"]: g["lr"] for g in sgd.param_groups}["lora_B"] == pytest.approx(0.4)


def test_same_rates_as_peft():
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    torch.manual_seed(0)
    ref = peft.get_peft_model(Net(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "fc1", "fc2"]))
    ref_opt = peft_loraplus(ref, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_lr_embedding=3e-6)
    ref_lrs = {}
    for g in ref_opt.param_groups:
        for p in g["params"]:
            name = next(n for n, q in ref.named_parameters() if q is p)
            # base_model.model.fc1.lora_A.default.weight -> fc1.lora_A
            parts = name.removeprefix("base_model.model.").split(".")
            ref_lrs[f"{parts[0]}.{parts[1].replace('lora_embedding_', 'lora_')}"] = g["lr"]
    ours = lorakit.inject(Net(), lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "fc1", "fc2"]))
    mine = {}
    for g in loraplus_param_groups(ours, lr=1e-3, ratio=16, embedding_lr=3e-6):
        for p in g["params"]:
            name = next(n for n, q in ours.named_parameters() if q is p)
            # fc1.lora.default.lora_A -> fc1.lora_A
            mine[f"{name.split('.')[0]}.{name.rsplit('.', 1)[1]}"] = g["lr"]
    assert mine == pytest.approx(ref_lrs)


def test_no_trainable_parameters_is_an_error():
    with pytest.raises(ConfigError, match="no trainable parameters"):
        loraplus_param_groups(nn.Linear(2, 2).requires_grad_(False), lr=1e-3)
    with pytest.raises(ConfigError, match="ratio=0"):
        loraplus_param_groups(injected(), lr=1e-3, ratio=0)
