"""The SVD-form adapter (§3.1): ΔW = P·diag(λ)·Q·scaling through the core contract, masking, cutting,
and the orthogonal regulariser (eq. 4 and the official form) against naive formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.errors import UnsupportedModuleError
from lorakit.variants.adalora import AdaLoraConfig, inject_adalora, orth_regularizer, svd_adapters

from conftest import tiny_gpt2, tiny_llama


def cfg(**kw):
    base = dict(init_r=4, target_r=2, total_step=10, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    base.update(kw)
    return AdaLoraConfig(**base)


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.lin = nn.Linear(5, 4)

    def forward(self, x):
        return self.lin(self.conv(x).mean(dim=(2, 3)))


def test_starts_unchanged(ids):
    base = tiny_llama()
    want = base(input_ids=ids).logits
    model = inject_adalora(tiny_llama(), cfg())
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)
    ad = next(iter(svd_adapters(model, "default").values()))
    assert torch.all(ad.lora_E == 0) and ad.lora_A.std() > 0 and ad.lora_B.std() > 0
    assert ad.scaling == 8 / (4 + 1e-5)  # α / (init_r + 1e-5), as PEFT and the official code


def test_delta_is_p_diag_lambda_q():
    model = inject_adalora(tiny_llama(), cfg(init_lora_weights=False))
    for ad in svd_adapters(model, "default").values():
        p, lam, q = ad.lora_B, ad.lora_E.view(-1), ad.lora_A  # (out, r), (r,), (r, in)
        torch.testing.assert_close(ad.delta_2d(), p @ torch.diag(lam) @ q * ad.scaling)
        a, b, s = ad.factors()  # what the fused branch consumes
        torch.testing.assert_close(s * b @ a, ad.delta_2d())


@pytest.mark.parametrize("make, targets", [(tiny_llama, ["q_proj", "down_proj"]), (tiny_gpt2, ["c_attn", "c_fc"]),
                                           (Convs, ["conv", "lin"])])
def test_forward_equals_dense_update(make, targets):
    model = inject_adalora(make(), cfg(target_modules=targets, init_lora_weights=False))
    hosts = {p: h for p, h in model.named_modules() if isinstance(h, lorakit.layers.host.LoraLayer)}
    g = torch.Generator().manual_seed(0)
    for host in hosts.values():
        base = host.base_layer
        if isinstance(base, nn.Conv2d):
            x = torch.randn(2, 3, 6, 6, generator=g)
            w = base.weight + host.delta("default")
            want = F.conv2d(x, w, base.bias, padding=1)
        else:
            fan_in = host.adapter("default").fan_in
            x = torch.randn(2, 5, fan_in, generator=g)
            w = host.kind.weight(base) + host.delta("default")
            want = x @ w + base.bias if host.kind.name == "conv1d_gpt2" else F.linear(x, w, base.bias)
        torch.testing.assert_close(host(x), want, rtol=1e-5, atol=1e-5)


def test_merge_equals_unmerged_and_unload_restores(ids):
    model = inject_adalora(tiny_llama(), cfg(init_lora_weights=False))
    want = model(input_ids=ids).logits
    lorakit.merge(model)
    lorakit.merge(model)  # idempotent
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    plain = lorakit.merge_and_unload(model)
    torch.testing.assert_close(plain(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    assert isinstance(plain.model.layers[0].self_attn.q_proj, nn.Linear)


def test_embedding_is_refused():
    with pytest.raises(UnsupportedModuleError, match="Remove it from target_modules"):
        inject_adalora(tiny_llama(), cfg(target_modules=["embed_tokens"]))


def test_only_adapter_trains_and_mask_zeroes_lambda_only(ids):
    model = inject_adalora(tiny_llama(), cfg(init_lora_weights=False))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora.default.lora_" in n for n in trainable)
    ad = next(iter(svd_adapters(model, "default").values()))
    p0, q0 = ad.lora_B.detach().clone(), ad.lora_A.detach().clone()
    ad.mask_(torch.tensor([True, False, True, False]))
    assert ad.lora_E[1].item() == 0 and ad.lora_E[3].item() == 0 and ad.lora_E[0].item() != 0
    assert torch.equal(ad.lora_B, p0) and torch.equal(ad.lora_A, q0) and ad.rank == 2
    model(input_ids=ids, labels=ids).loss.backward()
    assert ad.lora_E.grad[1].abs().item() > 0  # a pruned triplet still gets a gradient: it can come back


def test_cut_keeps_the_output(ids):
    model = inject_adalora(tiny_llama(), cfg(init_lora_weights=False))
    for ad in svd_adapters(model, "default").values():
        ad.mask_(torch.tensor([False, True, True, False]))
    want = model(input_ids=ids).logits
    for ad in svd_adapters(model, "default").values():
        ad.cut_()
        assert ad.r == 2 and ad.lora_A.shape == (2, 32) and ad.lora_B.shape[1] == 2
        assert ad.index.tolist() == [1, 2] and ad.pattern() == [False, True, True, False]
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-6, atol=1e-6)


def test_orth_regularizer_forms():
    model = inject_adalora(tiny_llama(), cfg())
    ads = list(svd_adapters(model, "default").values())
    paper, official = 0.0, []
    for ad in ads:  # naive: eq. 4 summed; the official code's mean of unsquared norms over P's and Q's
        p, q = ad.lora_B.detach(), ad.lora_A.detach()
        eye = torch.eye(ad.r)
        dp = sum(((p.T @ p - eye)[i, j]) ** 2 for i in range(ad.r) for j in range(ad.r))
        dq = sum(((q @ q.T - eye)[i, j]) ** 2 for i in range(ad.r) for j in range(ad.r))
        paper += dp + dq
        official += [dp.sqrt(), dq.sqrt()]
    torch.testing.assert_close(orth_regularizer(ads, "paper"), paper)
    torch.testing.assert_close(orth_regularizer(ads, "official"), sum(official) / len(official))
    # exactly orthonormal P and Q: R = 0 with a finite (zero) gradient, also for the unsquared norm
    with torch.no_grad():
        for ad in ads:
            ad.lora_A.copy_(torch.eye(ad.r, ad.fan_in))
            ad.lora_B.copy_(torch.eye(ad.fan_out, ad.r))
    for form in ("paper", "official"):
        r = orth_regularizer(ads, form)
        assert r.item() == 0
        r.backward()
        assert all(torch.equal(ad.lora_A.grad, torch.zeros_like(ad.lora_A)) for ad in ads)
        for ad in ads:
            ad.lora_A.grad = ad.lora_B.grad = None
