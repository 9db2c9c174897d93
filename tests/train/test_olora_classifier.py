"""`lorakit train --method olora` on a sequence classifier: the head (modules_to_save) trains and is in
the exported adapter (it was frozen and missing while O-LoRA had its own copy of the injection)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from lorakit.train import train

from .train_helpers import quick_args


def test_olora_trains_and_exports_the_classifier_head(tiny_cls, cls_file, tmp_path):
    from transformers import AutoModelForSequenceClassification

    result = train(quick_args(tiny_cls, cls_file, tmp_path / "o", method="olora", max_steps=3))
    assert result.metrics["args"]["modules_to_save"] == ["score"]
    weights = load_file(tmp_path / "o" / "adapter" / "adapter_model.safetensors")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_cls)
    head = weights["base_model.model.score.weight"]
    assert head.shape == base.score.weight.shape
    assert not torch.equal(head, base.score.weight.detach())  # trained, not the random init
    assert any(k.endswith("q_proj.lora_A.weight") for k in weights)
