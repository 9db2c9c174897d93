"""LoRA on grouped convolutions (groups > 1, depthwise included), in PEFT's form: A a dense conv in → r
with the base's kernel/stride/padding/dilation, B a grouped 1×…×1 conv r → out (r a multiple of groups).

The reference is the update written out here with loops over channels (``naive_delta``) and applied as a
plain dense convolution; merging is refused (the update does not fit a grouped weight) and leaves the
model as it was. PEFT parity (both file directions) is in tests/interop/test_peft_grouped_conv.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.adapter_kinds import OLORA
from lorakit.errors import AdapterStateError, ConfigError, UnsupportedModuleError
from lorakit.layers.host import LoraLayer
from lorakit.variants.adalora import AdaLoraConfig

CONV = {1: (nn.Conv1d, F.conv1d), 2: (nn.Conv2d, F.conv2d), 3: (nn.Conv3d, F.conv3d)}

# (dims, in, out, kernel, groups, r, conv kwargs)
CASES = [
    (1, 8, 8, 3, 2, 4, dict(padding=1, bias=True)),
    (1, 6, 6, 4, 6, 6, dict(padding=2, dilation=2, stride=2)),  # depthwise, dilated, strided
    (2, 8, 12, 3, 4, 8, dict(stride=2, padding=1, bias=False)),
    (2, 6, 6, (3, 5), 6, 12, dict(padding=(1, 2))),  # depthwise, r = 2·groups
    (2, 4, 8, 3, 4, 4, dict(padding="same", dilation=(1, 2))),  # depthwise with channel multiplier 2
    (2, 8, 8, 1, 2, 2, dict()),  # 1×1 grouped
    (3, 4, 8, 3, 2, 2, dict(stride=(1, 2, 1), padding=1)),
]
IDS = [f"conv{c[0]}d-g{c[4]}-r{c[5]}-{i}" for i, c in enumerate(CASES)]


def _model(dims, cin, cout, k, groups, kw, seed=0):
    torch.manual_seed(seed)
    conv_cls = CONV[dims][0]
    return nn.Sequential(conv_cls(cin, cout, k, groups=groups, **kw), nn.Tanh(), conv_cls(cout, 3, 1))


def _input(dims, cin, seed=1):
    size = {1: (2, cin, 11), 2: (2, cin, 9, 7), 3: (2, cin, 5, 6, 7)}[dims]
    return torch.randn(size, generator=torch.Generator().manual_seed(seed))


def naive_delta(a: torch.Tensor, b: torch.Tensor, groups: int, scaling: float) -> torch.Tensor:
    """ΔW (out, in, *k) of the branch B(A(x)) with B grouped, one output channel at a time: output channel
    o is in group o // (out/groups) and reads rank channels [grp·r/groups, (grp+1)·r/groups) of A."""
    r, cout = a.shape[0], b.shape[0]
    per_out, per_r = cout // groups, r // groups
    delta = torch.zeros(cout, *a.shape[1:], dtype=torch.float64)
    for o in range(cout):
        grp = o // per_out
        for j in range(per_r):
            delta[o] += float(b[o, j].detach().reshape(())) * a[grp * per_r + j].double()
    return delta * scaling


def naive_forward(model, base_conv, delta, x):
    """model's output with the first conv computing base(x) + conv(x, ΔW) (dense, groups = 1)."""
    fn = CONV[delta.dim() - 2][1]
    c = base_conv
    y = fn(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
    y = y + fn(x, delta.float(), None, c.stride, c.padding, c.dilation)
    return model[2](model[1](y))


def _adapted(case, r=None, alpha=6, **cfg):
    dims, cin, cout, k, groups, rank, kw = case
    model = _model(dims, cin, cout, k, groups, kw)
    base = model[0]
    lorakit.inject(model, lorakit.LoraConfig(r=r or rank, lora_alpha=alpha, target_modules=["0"],
                                             init_lora_weights=False, **cfg))
    return model, base


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_matches_the_naive_dense_update(case):
    dims, cin, cout, k, groups, r, kw = case
    model, base = _adapted(case)
    ad = model[0].lora["default"]
    assert tuple(ad.lora_A.shape) == (r, cin, *base.kernel_size)
    assert tuple(ad.lora_B.shape) == (cout, r // groups) + (1,) * dims  # PEFT's grouped 1×…×1 conv
    x = _input(dims, cin)
    with torch.no_grad():
        want = naive_forward(model, base, naive_delta(ad.lora_A, ad.lora_B, groups, 6 / r), x)
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the kind's one formula (delta_2d) is that same dense update
    torch.testing.assert_close(ad.delta_2d().double(), naive_delta(ad.lora_A, ad.lora_B, groups, 6 / r).flatten(1),
                               rtol=1e-6, atol=1e-6)


def test_b_zero_start_is_the_base_and_gradients_reach_both_factors():
    case = CASES[2]
    dims, cin, cout, k, groups, r, kw = case
    plain = _model(dims, cin, cout, k, groups, kw)
    model = _model(dims, cin, cout, k, groups, kw)
    lorakit.inject(model, lorakit.LoraConfig(r=r, target_modules=["0"]))
    x = _input(dims, cin)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    model[0].lora["default"].lora_B.data.normal_()
    model(x).square().sum().backward()
    ad = model[0].lora["default"]
    assert ad.lora_A.grad.abs().sum() > 0 and ad.lora_B.grad.abs().sum() > 0
    assert model[0].base_layer.weight.grad is None


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    state = model.state_dict()
    return state.keys() == snap.keys() and all(torch.equal(state[k], v) for k, v in snap.items())


@pytest.mark.parametrize("how", ["merge", "safe_merge", "merge_and_unload"])
def test_merge_is_refused_naming_the_module_and_changes_nothing(how):
    # one grouped conv and one plain conv adapted: the refusal comes before the plain one is merged
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    lorakit.inject(model, lorakit.LoraConfig(r=8, target_modules=["0", "1"], init_lora_weights=False))
    snap, x = _snapshot(model), torch.randn(1, 4, 5, 5)
    before = model(x)
    call = {"merge": lambda: lorakit.merge(model), "safe_merge": lambda: lorakit.merge(model, safe_merge=True),
            "merge_and_unload": lambda: lorakit.merge_and_unload(model)}[how]
    with pytest.raises(AdapterStateError, match=r"module '1'.*groups=8.*cannot hold.*unload"):
        call()
    assert _same(model, snap) and isinstance(model[0], LoraLayer) and model[0].merged == []
    assert model[1].merged == []
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_unload_gives_back_the_plain_grouped_conv():
    case = CASES[3]
    dims, cin, cout, k, groups, r, kw = case
    plain = _model(dims, cin, cout, k, groups, kw)
    model, base = _adapted(case)
    out = lorakit.unload(model)
    assert type(out[0]) is nn.Conv2d and out[0] is base and out[0].groups == groups
    x = _input(dims, cin)
    torch.testing.assert_close(out(x), plain(x), rtol=0, atol=0)


def test_disabled_and_deleted_adapter_give_the_base_output():
    case = CASES[0]
    dims, cin, cout, k, groups, r, kw = case
    plain = _model(dims, cin, cout, k, groups, kw)
    model, _ = _adapted(case)
    x = _input(dims, cin)
    with lorakit.disabled(model):
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    lorakit.delete_adapter(model, "default")
    assert type(model[0]) is nn.Conv1d
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("r, pattern", [(2, None), (8, {"1": 6}), (3, None)])
def test_rank_not_a_multiple_of_groups_is_a_config_error_naming_the_module(r, pattern):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, groups=4))
    snap = _snapshot(model)
    cfg = lorakit.LoraConfig(r=r, target_modules=["0", "1"], rank_pattern=pattern or {})
    with pytest.raises(ConfigError, match=r"module '1'.*groups=4.*not a multiple of groups.*multiple of 4"):
        lorakit.inject(model, cfg)
    assert _same(model, snap) and type(model[0]) is nn.Conv2d and type(model[1]) is nn.Conv2d
    assert lorakit.list_adapters(model) == []


@pytest.mark.parametrize("make_config, kw, what", [
    (lambda: lorakit.LoraConfig(r=4, target_modules=["1"], use_dora=True), {}, "DoRA"),
    (lambda: AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["1"]), {}, "AdaLoRA"),
    (lambda: lorakit.LoraConfig(r=4, target_modules=["1"]), {"kind": OLORA}, "O-LoRA"),
])
def test_variants_that_cannot_take_a_grouped_conv_refuse_it(make_config, kw, what):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, groups=2))
    snap = _snapshot(model)
    with pytest.raises(UnsupportedModuleError, match=rf"module '1'.*{what} is not supported on grouped.*plain LoRA"):
        lorakit.inject(model, make_config(), **kw)
    assert _same(model, snap) and type(model[1]) is nn.Conv2d


def test_pissa_init_on_a_grouped_conv_is_refused_as_not_linear():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(UnsupportedModuleError, match=r"module '0' is a Conv2d.*linear layers only"):
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["0"], init_lora_weights="pissa"))


def test_non_zero_padding_mode_is_refused():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2, padding=1, padding_mode="reflect"))
    with pytest.raises(UnsupportedModuleError, match=r"module '0'.*padding_mode='reflect'"):
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["0"]))


def _two_adapters():
    case = CASES[2]  # Conv2d 8 → 12, groups 4, r 8
    dims, cin, cout, k, groups, r, kw = case
    model = _model(dims, cin, cout, k, groups, kw)
    base = model[0]
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=4, target_modules=["0"], init_lora_weights=False), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=12, target_modules=["0"], init_lora_weights=False), "b")
    ads = model[0].lora
    want = 0.7 * naive_delta(ads["a"].lora_A, ads["a"].lora_B, groups, 4 / 8) \
        - 1.5 * naive_delta(ads["b"].lora_A, ads["b"].lora_B, groups, 12 / 4)
    return model, base, want, _input(dims, cin)


@pytest.mark.parametrize("method, svd_rank", [("cat", None), ("svd", 12)])
def test_combining_grouped_adapters_is_exact_at_full_rank(method, svd_rank):
    model, base, want, x = _two_adapters()
    lorakit.combine_adapters(model, ["a", "b"], [0.7, -1.5], "ab", method=method, svd_rank=svd_rank)
    new = model[0].lora["ab"]
    assert tuple(new.lora_B.shape) == (12, 12 // 4, 1, 1)
    lorakit.set_adapter(model, "ab")
    with torch.no_grad():
        torch.testing.assert_close(model(x), naive_forward(model, base, want, x), rtol=1e-4, atol=1e-5)


def test_svd_rank_not_a_multiple_of_groups_is_refused():
    model, *_ = _two_adapters()
    with pytest.raises(ConfigError, match=r"svd_rank a multiple of 4"):
        lorakit.combine_adapters(model, ["a", "b"], [1.0, 1.0], "ab", method="svd", svd_rank=6)
    assert "ab" not in lorakit.list_adapters(model)
