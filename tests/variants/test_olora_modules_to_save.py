"""O-LoRA on the one inject path: modules_to_save and bias modes work as for LoRA, and the exported
plain-LoRA file carries them so that PEFT reproduces the classifier's outputs."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.variants.olora import add_olora, next_task

from conftest import tiny_bert_cls


def test_olora_classifier_head_trains_and_round_trips_through_peft(tmp_path, ids):
    peft = pytest.importorskip("peft")
    m = tiny_bert_cls()
    cfg = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                             bias="lora_only", task_type="SEQ_CLS")
    add_olora(m, cfg)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save.olora.weight" in n for n in trainable)
    assert any(n.endswith("query.base_layer.bias") for n in trainable)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # two tasks: past factors + new ones, the head changed each time
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
        next_task(m)
    with torch.no_grad():
        want = m(input_ids=ids).logits
    lorakit.save_adapter(m, tmp_path / "o", "olora")
    pm = peft.PeftModel.from_pretrained(tiny_bert_cls(), tmp_path / "o").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    back = lorakit.load_adapter(tiny_bert_cls(), tmp_path / "o")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_olora_refuses_a_base_it_cannot_wrap_and_leaves_the_model_unchanged():
    from torch import nn

    from lorakit.errors import UnsupportedModuleError

    m = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(UnsupportedModuleError, match="groups=2"):
        add_olora(m, lorakit.LoraConfig(r=2, target_modules=["0"]))
    assert isinstance(m[0], nn.Conv2d) and lorakit.list_adapters(m) == []
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
