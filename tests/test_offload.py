"""Offloaded checkpointing (lorakit.offload): on CPU the hooks run (nothing moves) and the gradients
equal those of plain gradient checkpointing and of no checkpointing, dropout masks included."""

from __future__ import annotations

import torch
from tests.conftest import tiny_llama

import lorakit
from lorakit.offload import offload_checkpoints


def _grads(checkpointing: bool, offload: bool, min_bytes: int = 0):
    model = tiny_llama(seed=0, layers=3)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules="all-linear",
                                             init_lora_weights=False))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)  # the dropout masks
    with offload_checkpoints(enabled=offload, min_bytes=min_bytes) as hooks:
        loss = model(input_ids=ids, labels=ids).loss
    torch.manual_seed(99)  # the RNG moves on before backward: recompute must restore it
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, hooks.stats


def test_offloaded_checkpointing_gives_the_gradients_of_plain_checkpointing():
    loss_ref, ref, _ = _grads(checkpointing=False, offload=False)
    loss_ckpt, ckpt, _ = _grads(checkpointing=True, offload=False)
    loss_off, off, stats = _grads(checkpointing=True, offload=True)
    assert len(ref) == 3 * 7 * 2  # A and B of 7 projections in 3 blocks
    for name in ref:
        torch.testing.assert_close(ckpt[name], ref[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(off[name], ref[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_off, loss_ref)
    # The hooks saw every block's input (B, T, H) = (2, 12, 32) and, on CPU, moved nothing.
    assert stats.shapes.count((2, 12, 32)) >= 3
    assert stats.packed >= 3 and stats.moved == 0


def test_inside_a_block_the_checkpoint_keeps_its_own_tensors():
    # Without checkpointing every saved activation goes through the hooks; with it, only what lies
    # between the blocks (the checkpoint's inputs and the few tensors outside blocks).
    _, _, plain = _grads(checkpointing=False, offload=True)
    _, _, ckpt = _grads(checkpointing=True, offload=True)
    assert ckpt.packed < plain.packed / 3


def test_disabled_and_small_tensors_are_left_alone():
    _, _, stats = _grads(checkpointing=True, offload=False)
    assert stats.packed == 0
    _, _, stats = _grads(checkpointing=True, offload=True, min_bytes=1 << 30)
    assert stats.packed == 0
