"""The adapter protocol is sufficient for kinds with another forward: toy kinds defined HERE (a
delta-based one as LoHa/LoKr, one that writes only a slice of a fused projection) run through the
unchanged host, inject and merge, checked against naive formulas; bad input names the module."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.adapter_kinds import ADAPTER_KINDS, adapter_kind, kind_for_config, kind_for_file
from lorakit.errors import AdapterFileError, ConfigError, UnsupportedModuleError
from lorakit.layers.protocol import Adapter, AdapterKind

from conftest import tiny_gpt2


class HadamardAdapter(Adapter):
    """LoHa-like: ΔW = s · (B1 A1) ⊙ (B2 A2), applied as a dense weight (no fused factor branch)."""

    def __init__(self, fan_out, fan_in, r, s):
        super().__init__()
        g = torch.Generator().manual_seed(fan_out * 31 + fan_in)
        self.w1_a, self.w2_a = (nn.Parameter(torch.randn(r, fan_in, generator=g)) for _ in range(2))
        self.w1_b, self.w2_b = (nn.Parameter(torch.randn(fan_out, r, generator=g)) for _ in range(2))
        self.s = s

    def delta_2d(self, base_weight=None):
        return self.s * (self.w1_b @ self.w1_a) * (self.w2_b @ self.w2_a)

    def forward_into(self, kind, base, base_out, x, mask):
        xd = x if mask is None else x * mask
        return base_out + kind.apply_weight(base, xd, self.delta_2d()).to(base_out.dtype)

    def peft_tensors(self, kind):
        return {"hada_w1_a": self.w1_a, "hada_w1_b": self.w1_b, "hada_w2_a": self.w2_a, "hada_w2_b": self.w2_b}


class HadamardKind(AdapterKind):
    name = "toy_loha"
    peft_type = "TOY"
    config_type = lorakit.LoraConfig

    def accepts_config(self, config):
        return False

    def create(self, base_kind, base, path, config):
        w = base_kind.weight_2d(base)
        return HadamardAdapter(w.shape[0], w.shape[1], config.r, 0.01)


class SliceAdapter(Adapter):
    """Writes only output columns [lo, hi) of a fused projection (e.g. the v part of a qkv Linear)."""

    def __init__(self, lo, hi, fan_in, r):
        super().__init__()
        self.lo, self.hi = lo, hi
        self.a = nn.Parameter(torch.randn(r, fan_in) * 0.1)
        self.b = nn.Parameter(torch.randn(hi - lo, r) * 0.1)

    def delta_2d(self, base_weight=None):
        d = self.a.new_zeros(self.fan_out, self.a.shape[1])
        d[self.lo:self.hi] = self.b @ self.a
        return d

    def forward_into(self, kind, base, base_out, x, mask):
        out = base_out.clone()
        out[..., self.lo:self.hi] += (x @ self.a.T) @ self.b.T
        return out

    def peft_tensors(self, kind):
        return {"a": self.a, "b": self.b}


class SliceKind(AdapterKind):
    name = "toy_slice"
    config_type = lorakit.LoraConfig

    def accepts_config(self, config):
        return False

    def refuses(self, base_kind, base):
        return None if base_kind.linear else "a sliced adapter needs a linear projection. Target a Linear"

    def create(self, base_kind, base, path, config):
        ad = SliceAdapter(8, 12, base.in_features, config.r)
        ad.fan_out = base.out_features
        return ad


def _dense_reference(base: nn.Module, kind, delta_2d: torch.Tensor, x):
    """The base module run with W + ΔW (the weight edited by hand in a copy)."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        ref.weight += kind.to_layout(ref, delta_2d)
    return ref(x)


@pytest.mark.parametrize("make, x", [
    (lambda: nn.Linear(6, 5), torch.randn(3, 6)),
    (lambda: nn.Conv2d(3, 4, 3, padding=1, stride=2), torch.randn(2, 3, 7, 7)),
    (lambda: nn.Embedding(11, 5, padding_idx=0), torch.tensor([[0, 3, 10], [4, 4, 1]])),
])
def test_delta_based_kind_runs_on_every_base_kind_unchanged(make, x):
    torch.manual_seed(0)
    model = nn.Sequential(make())
    base = copy.deepcopy(model[0])
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"]), "h", kind=HadamardKind())
    host = model[0]
    delta = host.lora["h"].delta_2d().detach()
    with torch.no_grad():
        want = _dense_reference(base, host.kind, delta, x)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        lorakit.merge(model)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        lorakit.unmerge(model)
        torch.testing.assert_close(model[0].base_layer.weight, base.weight, rtol=0, atol=1e-6)


def test_delta_based_kind_on_gpt2_conv1d_trains_and_saves_through_the_core(tmp_path):
    m = tiny_gpt2()
    lorakit.inject(m, lorakit.LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"]), "h",
                   kind=HadamardKind())
    trainable = sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert trainable and all(".lora.h." in n or "modules_to_save.h" in n for n in trainable)
    host = m.transformer.h[0].attn.c_attn
    x = torch.randn(2, 3, host.base_layer.weight.shape[0])
    with torch.no_grad():
        want = _dense_reference(host.base_layer, host.kind, host.lora["h"].delta_2d(), x)
        torch.testing.assert_close(host(x), want, rtol=1e-5, atol=1e-5)
    keys = set(lorakit.io.adapter_tensors(m, "h"))
    assert "base_model.model.transformer.h.0.attn.c_attn.hada_w1_a" in keys
    assert "base_model.model.lm_head.weight" in keys  # modules_to_save, by construction


def test_sliced_kind_writes_only_its_output_columns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12))
    x = torch.randn(4, 6)
    with torch.no_grad():
        before = model(x)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"]), "s", kind=SliceKind())
    with torch.no_grad():
        after = model(x)
        assert torch.equal(after[:, :8], before[:, :8])
        ad = model[0].lora["s"]
        torch.testing.assert_close(after[:, 8:], before[:, 8:] + x @ (ad.b @ ad.a).T)
        lorakit.merge(model)
        torch.testing.assert_close(model(x), after, rtol=1e-5, atol=1e-6)


def test_a_kind_that_refuses_a_base_names_the_module_and_leaves_the_model_unchanged():
    model = nn.Sequential(nn.Linear(4, 4), nn.Embedding(5, 4))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedModuleError, match=r"module '1' \(Embedding\).*Target a Linear"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0", "1"]), "s", kind=SliceKind())
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Embedding
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert lorakit.list_adapters(model) == []


def test_grouped_conv_error_names_the_module():
    # a grouped conv takes LoRA only with r a multiple of groups (PEFT's rule); the geometry's error gets the path
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match=r"module '0'.*groups=2.*remove the module from target_modules"):
        lorakit.inject(model, lorakit.LoraConfig(r=3, target_modules=["0"]))


def test_wrong_config_for_a_kind_and_unknown_file_types():
    from lorakit.variants.adalora import AdaLoraConfig

    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="needs a AdaLoraConfig|needs an? AdaLoraConfig"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"]), kind=adapter_kind("adalora"))
    with pytest.raises(ConfigError, match="got dict"):
        lorakit.inject(model, {"r": 2})
    assert kind_for_config(AdaLoraConfig(target_modules=["0"], total_step=10)).name == "adalora"
    assert kind_for_config(lorakit.LoraConfig(target_modules=["0"])).name == "lora"
    with pytest.raises(AdapterFileError, match="peft_type 'IA3' is not supported"):
        kind_for_file({"peft_type": "IA3"}, "x/adapter_config.json")
    assert [k.name for k in ADAPTER_KINDS] == ["adalora", "olora", "lora_sliced", "dora", "lora", "loha", "lokr"]
    assert kind_for_config(lorakit.LoraConfig(target_modules=["0"], use_dora=True)).name == "dora"
    with pytest.raises(lorakit.LorakitError, match="unknown adapter kind"):
        adapter_kind("nope")


def test_embedding_lookup_apply_weight_matches_f_embedding():
    emb = nn.Embedding(7, 3, padding_idx=1)
    from lorakit.layers.kinds import kind_of

    kind = kind_of(emb)
    assert kind.embedding and not kind.linear and not kind.transposed
    w = torch.randn(3, 7)  # (fan_out=dim, fan_in=num)
    ids = torch.tensor([1, 2, 6])
    torch.testing.assert_close(kind.apply_weight(emb, ids, w), F.embedding(ids, w.T))


class RescaleAdapter(Adapter):
    """DoRA-like (Liu et al. 2024, §4.1): W' = m ⊙ V / ‖V‖_row with V = W0 + s·B·A; exercises
    ``needs_base_weight`` and ``unmerge_delta_2d`` (W0 recovered with the norm cached at merge)."""

    needs_base_weight = True

    def __init__(self, w0: torch.Tensor, r: int, s: float):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.a = nn.Parameter(torch.randn(r, w0.shape[1], generator=g) * 0.3)
        self.b = nn.Parameter(torch.randn(w0.shape[0], r, generator=g) * 0.3)
        self.m = nn.Parameter(w0.norm(dim=1) * 1.5)
        self.s = s
        self._norm = None

    def _scale(self, w0):
        v = w0 + self.s * self.b @ self.a
        return v, self.m / v.norm(dim=1)

    def delta_2d(self, base_weight=None):
        v, scale = self._scale(base_weight)
        self._norm = v.norm(dim=1).detach()  # cached for unmerge, as PEFT does
        return scale[:, None] * v - base_weight

    def unmerge_delta_2d(self, merged_weight=None):
        w0 = merged_weight / (self.m / self._norm)[:, None] - self.s * self.b @ self.a
        return merged_weight - w0

    def forward_into(self, kind, base, base_out, x, mask):
        w0 = kind.weight_2d(base)
        bias = kind.bias(base)
        _, scale = self._scale(w0)
        direct = base_out - (bias if bias is not None else 0)  # W0 x
        lora = (x @ self.a.T) @ self.b.T * self.s
        return scale * (direct + lora) + (bias if bias is not None else 0)

    def peft_tensors(self, kind):
        return {"lora_A.weight": self.a, "lora_B.weight": self.b, "lora_magnitude_vector": self.m}


class RescaleKind(AdapterKind):
    name = "toy_dora"
    config_type = lorakit.LoraConfig

    def accepts_config(self, config):
        return False

    def create(self, base_kind, base, path, config):
        return RescaleAdapter(base_kind.weight_2d(base).detach().float(), config.r, 0.5)


def test_weight_dependent_kind_merges_and_unmerges_through_the_host():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    w0 = model[0].weight.detach().clone()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"]), "d", kind=RescaleKind())
    ad = model[0].lora["d"]
    x = torch.randn(4, 6)
    with torch.no_grad():
        v = w0 + 0.5 * ad.b @ ad.a
        w_new = ad.m[:, None] * v / v.norm(dim=1, keepdim=True)  # the formula, written out here
        want = F.linear(x, w_new, model[0].base_layer.bias)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        lorakit.merge(model)
        torch.testing.assert_close(model[0].base_layer.weight, w_new, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        lorakit.unmerge(model)
        torch.testing.assert_close(model[0].base_layer.weight, w0, rtol=1e-5, atol=1e-6)
