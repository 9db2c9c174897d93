"""Issue 17 · NEFTune (Jain et al. 2023, Algorithm 1): X_emb + α/√(L·d) · U(-1, 1) while training only."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.train import TrainArgs, train
from lorakit.train.neftune import NEFTuneHook, neftune_forward_hook

from .train_helpers import quick_args


def test_noise_follows_the_formula():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 64)
    ids = torch.randint(0, 50, (8, 128))  # B=8, L=128, d=64
    clean = emb(ids).detach()
    alpha = 5.0
    handle = emb.register_forward_hook(neftune_forward_hook(alpha))
    noise = (emb(ids) - clean).detach()
    scale = alpha / math.sqrt(128 * 64)  # α/√(L·d), written out
    # U(-s, s): bounded by s, reaching close to it, mean 0, variance s²/3
    assert noise.abs().max() <= scale * (1 + 1e-5)
    assert noise.abs().max() >= 0.99 * scale
    assert abs(noise.mean().item()) < 0.02 * scale
    assert noise.var().item() == pytest.approx(scale ** 2 / 3, rel=0.02)
    emb.eval()
    assert torch.equal(emb(ids), clean)  # no noise at evaluation
    handle.remove()


def test_hook_attaches_and_detaches(tiny_lm):
    from transformers import AutoModelForCausalLM

    from lorakit.train.hooks import HookContext

    net = AutoModelForCausalLM.from_pretrained(tiny_lm)
    net.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    clean = net.get_input_embeddings()(ids)
    hook, ctx = NEFTuneHook(5.0), HookContext(model=net, optimizer=None, step=0, total_steps=1)
    hook.on_train_start(ctx)
    assert not torch.equal(net.get_input_embeddings()(ids), clean)
    hook.on_train_end(ctx)
    assert torch.equal(net.get_input_embeddings()(ids), clean)


def test_option_is_validated_and_used_in_a_run(tmp_path, tiny_lm, instr_file):
    with pytest.raises(ConfigError, match="neftune_alpha=-1"):
        TrainArgs(neftune_alpha=-1)
    ev = str(instr_file)
    a = train(quick_args(tiny_lm, instr_file, tmp_path / "a", max_steps=2, eval_data=ev))
    b = train(quick_args(tiny_lm, instr_file, tmp_path / "b", max_steps=2, eval_data=ev, neftune_alpha=5.0))
    c = train(quick_args(tiny_lm, instr_file, tmp_path / "c", max_steps=2, eval_data=ev, neftune_alpha=5.0))
    assert a.metrics["loss"]["first"] != b.metrics["loss"]["first"]  # the noise reaches the loss
    assert b.metrics["loss"] == c.metrics["loss"]  # and is seeded
    # eval before training sees clean embeddings: identical with and without NEFTune
    assert a.metrics["eval"]["before"] == b.metrics["eval"]["before"]
