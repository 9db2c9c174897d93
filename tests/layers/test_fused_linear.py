"""The fused form of the branch on a plain nn.Linear (layers/branch.py ``lora_linear_fused``; the host
takes it when one adapter on the default factor branch is live and ``LinearKind.can_fuse`` holds):
output and every gradient against the naive formula written here, and every case where the base module
must still run itself (hooks, subclasses, autocast, other dtypes, several adapters, DoRA, …)."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.layers.test_seeded_dropout import ref_keep, seed_after
from torch import nn

import lorakit
from lorakit.layers.branch import set_fusion
from lorakit.layers.host import LoraLayer


def _model(bias=True, p=0.0, dtype=torch.float32, in_f=24, out_f=10, **cfg):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=bias)).to(dtype)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["0"], **cfg))
    with torch.no_grad():
        model[0].lora["default"].lora_B.normal_()  # B = 0 at init would hide half the formula
    return model.train()


def _fused(y) -> bool:
    return bool(getattr(y.grad_fn, "fused", False))


def _grads(model, x):
    return [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("bias,train_base", [(True, "none"), (False, "none"), (True, "bias"), (True, "all"),
                                             (False, "all")])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("shape,transpose", [((7, 24), False), ((3, 5, 24), False), ((5, 3, 24), True)])
def test_fused_output_and_gradients_match_the_naive_formula(bias, p, shape, transpose, train_base):
    """y = x Wᵀ + b + s·((x ⊙ m)/(1−p̃)) Aᵀ Bᵀ, m from the documented hash; ∂x, ∂A, ∂B (and ∂W, ∂b when
    the base is trainable) by autograd on that formula."""
    model = _model(bias=bias, p=p)
    lin, ad = model[0].base_layer, model[0].lora["default"]
    if train_base == "bias":
        lin.bias.requires_grad_(True)
    elif train_base == "all":
        lin.requires_grad_(True)
    torch.manual_seed(1)
    x0 = torch.randn(shape)
    x = (x0.transpose(0, 1) if transpose else x0).detach().requires_grad_(True)
    torch.manual_seed(42)
    y = model(x)
    assert _fused(y)
    seed = seed_after(42)
    keep = torch.from_numpy(ref_keep(seed, p, x.numel())).view(x.shape) if p else torch.ones(x.shape, dtype=torch.bool)
    p_used = round(p * 65536) / 65536
    xr = x.detach().clone().requires_grad_(True)
    w = lin.weight.detach().clone().requires_grad_(lin.weight.requires_grad)
    b0 = lin.bias.detach().clone().requires_grad_(lin.bias.requires_grad) if bias else None
    a = ad.lora_A.detach().clone().requires_grad_(True)
    b = ad.lora_B.detach().clone().requires_grad_(True)
    ref = xr @ w.T + (b0 if bias else 0) + 2.0 * ((xr * keep / (1 - p_used)) @ a.T) @ b.T
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(y.shape)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ad.lora_A.grad, a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ad.lora_B.grad, b.grad, rtol=1e-5, atol=1e-5)
    if lin.weight.requires_grad:
        torch.testing.assert_close(lin.weight.grad, w.grad, rtol=1e-5, atol=1e-5)
    if bias and lin.bias.requires_grad:
        torch.testing.assert_close(lin.bias.grad, b0.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fused_equals_unfused_and_input_without_grad(p):
    """The same step with fusion off (the base as its own node) gives the same output and gradients; an
    input that does not require grad (the first layer of a frozen model) gets no ∂x computed."""
    m1 = _model(p=p)
    m2 = copy.deepcopy(m1)
    x = torch.randn(4, 6, 24)
    torch.manual_seed(3)
    y1 = m1(x)
    was = set_fusion(False)
    try:
        torch.manual_seed(3)
        y2 = m2(x)
    finally:
        set_fusion(was)
    assert _fused(y1) and not _fused(y2)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    y1.square().sum().backward()
    y2.square().sum().backward()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        if p1.requires_grad:  # the same sums in another order: equal to rounding, relative to their size
            assert (p1.grad - p2.grad).abs().max() <= 1e-5 * p2.grad.abs().max()


def test_fused_in_bf16_and_under_no_grad():
    model = _model(dtype=torch.bfloat16)
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    lin, ad = model[0].base_layer, model[0].lora["default"]
    ref = (x.float() @ lin.weight.float().T + lin.bias.float()
           + 2.0 * (x.float() @ ad.lora_A.float().T) @ ad.lora_B.float().T)
    y = model(x)
    assert _fused(y) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        torch.testing.assert_close(model(x).float(), ref, rtol=2e-2, atol=2e-2)


class _MyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0  # a subclass may do anything: it must run


def _unfused_cases():
    """(name, make(model) -> context or None); each makes the host run the base module itself."""
    def hook(model):
        model[0].base_layer.register_forward_hook(lambda mod, inp, out: out * 3.0)

    def pre_hook(model):
        model[0].base_layer.register_forward_pre_hook(lambda mod, inp: (inp[0] * 0.5,))

    def instance_forward(model):  # accelerate's add_hook_to_module replaces forward on the instance
        base = model[0].base_layer
        orig = base.forward
        base.forward = lambda x: orig(x) + 1.0

    def global_hook(model):
        return nn.modules.module.register_module_forward_hook(
            lambda mod, inp, out: out + 1.0 if isinstance(mod, nn.Linear) else None)

    def autocast(model):
        return "autocast"

    return [("hook", hook), ("pre_hook", pre_hook), ("instance_forward", instance_forward),
            ("global_hook", global_hook), ("autocast", autocast)]


@pytest.mark.parametrize("name,make", _unfused_cases(), ids=[c[0] for c in _unfused_cases()])
def test_base_runs_itself_where_it_must(name, make):
    """A hook, an instance-level forward or autocast on: the base module runs as it would without
    lorakit (its hook's effect is in the output), and the branch is added to that."""
    model = _model()
    lin, ad = model[0].base_layer, model[0].lora["default"]
    x = torch.randn(3, 24)
    handle = make(model)
    try:
        if handle == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = model(x)
                base = lin(x)
            tol = dict(rtol=3e-2, atol=3e-2)
        else:
            y = model(x)
            base = lin(x)  # whatever the hooks make of the base's output
            tol = dict(rtol=1e-5, atol=1e-5)
    finally:
        if handle is not None and handle != "autocast":
            handle.remove()
    assert not _fused(y)
    branch = 2.0 * (x @ ad.lora_A.detach().T) @ ad.lora_B.detach().T
    torch.testing.assert_close(y.float(), (base.float() + branch).detach(), **tol)


def test_not_fused_for_a_subclass_a_dtype_mismatch_two_adapters_merged_or_dora():
    x = torch.randn(3, 24)
    torch.manual_seed(0)
    sub = nn.Sequential(_MyLinear(24, 10))
    lorakit.inject(sub, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    assert not _fused(sub(x))
    torch.testing.assert_close(sub(x), sub[0].base_layer(x))  # B = 0: the subclass's own forward, doubled

    model = _model()
    lin, kind = model[0].base_layer, model[0].kind
    assert kind.can_fuse(lin, x) and _fused(model(x))
    assert not kind.can_fuse(lin, x.double()) and not kind.can_fuse(lin, x.bfloat16())  # F.linear's own error
    assert not kind.can_fuse(lin, x.to("meta"))

    two = _model()
    two[0].add("second", copy.deepcopy(two[0].lora["default"]))
    two[0].active = ("default", "second")
    assert not _fused(two(x))
    two[0].active = ("default",)
    assert _fused(two(x))
    two[0].merge(["default"])
    assert not _fused(two(x))  # merged: the base alone

    dora = _model(use_dora=True)
    y = dora(x)
    assert not _fused(y)


def test_host_with_kwargs_or_rows_is_not_fused():
    model = _model()
    assert isinstance(model[0], LoraLayer)
    x = torch.randn(2, 24)
    model[0].row_adapters = ["default", None]
    y = model(x)
    model[0].row_adapters = None
    assert not _fused(y)
    lin, ad = model[0].base_layer, model[0].lora["default"]
    want0 = lin(x[:1]) + 2.0 * (x[:1] @ ad.lora_A.T) @ ad.lora_B.T
    torch.testing.assert_close(y[:1], want0.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[1:], lin(x[1:]).detach(), rtol=1e-5, atol=1e-5)
