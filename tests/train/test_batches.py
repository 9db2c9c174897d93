"""The batch plan: deterministic, resumable, and the same global batches for any process count."""

from __future__ import annotations

import torch

from lorakit.data.batches import IGNORE, BatchPlan, batch_loss_sum, collate, target_count
from lorakit.train.schedule import lr_factor


def test_same_global_batches_for_any_world_size_and_accumulation():
    one = BatchPlan(n=37, batch_size=8, grad_accum=1, world_size=1, seed=3)
    two = BatchPlan(n=37, batch_size=2, grad_accum=2, world_size=2, seed=3)
    assert one.global_batch == two.global_batch == 8
    for step in range(12):  # crosses epoch boundaries (5 steps per epoch)
        (single,) = one.micro_batches(step, 0)
        split = [i for r in range(2) for i in two.micro_batches(step, r)[0] + two.micro_batches(step, r)[1]]
        assert sorted(single) == sorted(split)


def test_epochs_are_permutations_and_plans_are_deterministic():
    plan = BatchPlan(n=10, batch_size=5, grad_accum=1, world_size=1, seed=0)
    assert plan.steps_per_epoch == 2
    epoch0 = plan.micro_batches(0, 0)[0] + plan.micro_batches(1, 0)[0]
    epoch1 = plan.micro_batches(2, 0)[0] + plan.micro_batches(3, 0)[0]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    again = BatchPlan(n=10, batch_size=5, grad_accum=1, world_size=1, seed=0)
    assert again.micro_batches(3, 0) == plan.micro_batches(3, 0)  # no state: resume needs the step only
    assert plan.total_steps(epochs=1.5, max_steps=None) == 3 and plan.total_steps(1, max_steps=7) == 7


def test_last_short_batch_wraps_around():
    plan = BatchPlan(n=5, batch_size=4, grad_accum=1, world_size=1, seed=0)
    second = plan.micro_batches(1, 0)[0]
    assert len(second) == 4 and len(set(plan.micro_batches(0, 0)[0] + second)) == 5


def test_collate_pads_and_masks():
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [1, 5], "labels": [-100, 5]}], 0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 5, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 5, -100]]
    assert target_count(batch) == 3


def test_loss_sum_matches_the_mean_of_transformers():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE, 1, 2, 3, IGNORE], [IGNORE, IGNORE, 4, 5, 6]])
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    n = int((labels[:, 1:] != IGNORE).sum())
    assert torch.allclose(batch_loss_sum(logits, labels) / n, ref)


def test_lr_schedules():
    assert [round(lr_factor(s, 10, 2, "constant"), 3) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "linear") == 1.0 and abs(lr_factor(9, 10, 2, "linear") - 1 / 8) < 1e-9
    assert lr_factor(2, 10, 2, "cosine") == 1.0 and lr_factor(9, 10, 2, "cosine") < 0.05
