"""`offload_checkpoints=true` in a training run: on CPU the offload hooks run (a no-op move), so the run
gives the losses and adapter of plain gradient checkpointing exactly; without checkpointing it is refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import ConfigError
from lorakit.train import train

from .train_helpers import quick_args


def test_offloaded_checkpointing_run_equals_plain_checkpointing(tiny_lm, tmp_path):
    kw = dict(max_steps=2, gradient_checkpointing=True, lora_dropout=0.1)
    plain = train(quick_args(tiny_lm, "builtin:rev", tmp_path / "plain", **kw))
    off = train(quick_args(tiny_lm, "builtin:rev", tmp_path / "off", offload_checkpoints=True, **kw))
    assert off.metrics["loss"] == plain.metrics["loss"]
    a = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "off" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_offload_checkpoints_needs_gradient_checkpointing(tiny_lm, tmp_path):
    with pytest.raises(ConfigError, match="offload_checkpoints=true .* needs gradient_checkpointing=true"):
        quick_args(tiny_lm, "builtin:rev", tmp_path / "x", offload_checkpoints=True)
