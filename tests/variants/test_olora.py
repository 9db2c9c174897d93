"""O-LoRA: the overlap term against a naive formula, exact concatenation, frozen past factors,
the hook, export as a plain LoRA adapter, and bad input."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.errors import AdapterNotFoundError, ConfigError
from lorakit.train.hooks import HookContext
from lorakit.variants.olora import (
    OLoraAdapter,
    OLoraHook,
    add_olora,
    export_lora,
    next_task,
    olora_adapters,
    olora_loss,
    overlap,
)

from conftest import tiny_gpt2, tiny_llama

CFG = dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"])


def _randomize(model):
    with torch.no_grad():
        for _, ad in olora_adapters(model):
            ad.lora_A.normal_()
            ad.lora_B.normal_()


def test_overlap_matches_the_naive_sum():
    g = torch.Generator().manual_seed(0)
    past, new = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)
    naive_abs = sum(abs(sum(past[i, k] * new[j, k] for k in range(7))) for i in range(5) for j in range(3))
    naive_sq = sum(sum(past[i, k] * new[j, k] for k in range(7)) ** 2 for i in range(5) for j in range(3))
    assert torch.allclose(overlap(past, new, "abs"), torch.as_tensor(naive_abs), rtol=1e-5)
    assert torch.allclose(overlap(past, new, "square"), torch.as_tensor(naive_sq), rtol=1e-5)
    assert overlap(torch.zeros(0, 7), new).item() == 0.0
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g))
    assert overlap(q[:3], q[3:6], "square").item() < 1e-10  # orthogonal rows: no overlap
    with pytest.raises(ConfigError, match="'abs'"):
        overlap(past, new, "l1")


def test_loss_sums_over_layers_and_tasks():
    model = add_olora(tiny_llama(), lorakit.LoraConfig(**CFG))
    _randomize(model)
    assert olora_loss(model) is None  # no past task yet, λ2 = 0
    firsts = {p: ad.lora_A.detach().clone() for p, ad in olora_adapters(model)}
    next_task(model)
    _randomize(model)
    seconds = {p: ad.lora_A.detach().clone() for p, ad in olora_adapters(model)}
    next_task(model)
    _randomize(model)
    expected = torch.zeros(())
    for p, ad in olora_adapters(model):
        for past in (firsts[p], seconds[p]):  # Σ over past tasks of Σ|A_i A_tᵀ|
            expected = expected + (past @ ad.lora_A.detach().T).abs().sum()
    assert torch.allclose(olora_loss(model, lambda_orth=1.0).detach(), expected, rtol=1e-5)
    assert torch.allclose(olora_loss(model, lambda_orth=0.5).detach(), 0.5 * expected, rtol=1e-5)
    l2 = sum(ad.lora_A.detach().square().sum() + ad.lora_B.detach().square().sum() for _, ad in olora_adapters(model))
    assert torch.allclose(olora_loss(model, lambda_orth=0.0, lambda_l2=0.1).detach(), 0.1 * l2, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_concatenation_keeps_outputs_identical(make, ids):
    model = make()
    targets = ["q_proj", "v_proj"] if make is tiny_llama else ["c_attn"]
    add_olora(model, lorakit.LoraConfig(r=3, lora_alpha=6, target_modules=targets))
    _randomize(model)
    with torch.no_grad():
        before = model(ids).logits
        deltas = {p: ad.delta_2d().clone() for p, ad in olora_adapters(model)}
    assert next_task(model) == 1
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    for p, ad in olora_adapters(model):
        assert ad.past_rank == 3 and not ad.lora_B.any()  # fresh pair: B = 0
        torch.testing.assert_close(ad.delta_2d(), deltas[p], rtol=0, atol=1e-6)


def test_past_updates_sum_exactly_even_with_different_scalings(ids):
    model = add_olora(tiny_llama(), lorakit.LoraConfig(**CFG))
    _randomize(model)
    next_task(model)
    _randomize(model)
    for _, ad in olora_adapters(model):
        ad.scaling = 0.7  # e.g. a second task trained with another alpha
    with torch.no_grad():
        for _, ad in olora_adapters(model):
            manual = ad.past_B @ ad.past_A + 0.7 * ad.lora_B @ ad.lora_A
            torch.testing.assert_close(ad.delta_2d(), manual)
        out = model(ids).logits
        next_task(model)
        torch.testing.assert_close(model(ids).logits, out, rtol=0, atol=1e-5)


def test_past_factors_are_frozen_buffers(ids):
    model = add_olora(tiny_llama(), lorakit.LoraConfig(**CFG))
    _randomize(model)
    next_task(model)
    _randomize(model)
    lorakit.set_adapter(model, "olora")  # refreshing trainability must not unfreeze the past
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert not any("past" in n for n, _ in model.named_parameters())
    state = model.state_dict()
    assert any(k.endswith("olora.past_A") for k in state)  # saved with the model
    pasts = {p: ad.past_A.clone() for p, ad in olora_adapters(model)}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = model(ids, labels=ids).loss + olora_loss(model)
    loss.backward()
    opt.step()
    for p, ad in olora_adapters(model):
        assert torch.equal(ad.past_A, pasts[p])
        assert ad.lora_A.grad is not None


def test_hook_adds_the_term_and_rejects_bad_settings():
    model = add_olora(tiny_llama(), lorakit.LoraConfig(**CFG))
    _randomize(model)
    next_task(model)
    _randomize(model)
    hook = OLoraHook(lambda_orth=0.5)
    ctx = HookContext(model=model, optimizer=None, step=0, total_steps=1)
    hook.on_train_start(ctx)
    loss = hook.extra_loss(ctx)
    assert torch.allclose(loss, olora_loss(model, 0.5)) and ctx.log["olora_loss"] > 0
    with pytest.raises(ConfigError, match="lambda_orth"):
        OLoraHook(lambda_orth=-1)
    with pytest.raises(ConfigError, match="overlap"):
        OLoraHook(overlap="cube")
    with pytest.raises(AdapterNotFoundError, match="add_olora"):
        OLoraHook().on_train_start(HookContext(model=tiny_llama(), optimizer=None, step=0, total_steps=1))
    with pytest.raises(AdapterNotFoundError, match="add_olora"):
        next_task(tiny_llama())


def test_merge_and_export_as_plain_lora(ids, tmp_path):
    model = add_olora(tiny_llama(), lorakit.LoraConfig(**CFG))
    _randomize(model)
    next_task(model)
    _randomize(model)
    with torch.no_grad():
        out = model(ids).logits
    export_lora(model, tmp_path / "flat")
    plain = lorakit.unload(model)
    fresh = tiny_llama()
    fresh.load_state_dict(plain.state_dict())
    lorakit.load_adapter(fresh, tmp_path / "flat")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, out, rtol=0, atol=1e-5)
    merged = lorakit.merge_and_unload(fresh)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, out, rtol=0, atol=1e-4)


def test_adapter_contract():
    from lorakit.layers.kinds import Geometry

    ad = OLoraAdapter(Geometry((2, 5), (4, 2)), r=2, alpha=4, scaling=2.0, dropout=0.0)
    ad.reset(False)
    a, b, s = ad.factors()
    assert a.shape == (2, 5) and b.shape == (4, 2) and s == 2.0
    ad.consolidate()
    a, b, s = ad.factors()
    assert a.shape == (4, 5) and b.shape == (4, 4) and ad.past_ranks == [2]


def test_save_adapter_on_olora_exports_a_peft_lora_with_identical_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    import lorakit
    from lorakit.variants.olora import add_olora, next_task

    from conftest import tiny_llama

    m = tiny_llama()
    add_olora(m, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # two tasks: the second adds new factors beside the frozen past ones
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        next_task(m)
    ids = torch.randint(0, 100, (2, 7), generator=g)
    with torch.no_grad():
        want = m(input_ids=ids).logits
    lorakit.save_adapter(m, tmp_path / "o", "olora")
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "o").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
