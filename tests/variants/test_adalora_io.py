"""AdaLoRA files in PEFT's format, both ways, with identical outputs; bad rank patterns are refused."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import AdapterFileError, LorakitError
from lorakit.variants.adalora import (
    AdaLoraConfig,
    RankAllocator,
    RankPatternError,
    current_ranks,
    inject_adalora,
    load_adalora,
    orth_regularizer,
    save_adalora,
    svd_adapters,
)

from conftest import tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", module="peft")


class Convs(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.lin = nn.Linear(5, 4)

    def forward(self, x):
        return self.lin(self.conv(x).mean(dim=(2, 3)))


SCHEDULE = dict(init_r=6, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=10, lora_alpha=12)
CASES = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"]),
    "conv2d": (Convs, ["conv", "lin"]),
}


def _inputs(case):
    g = torch.Generator().manual_seed(3)
    if case == "conv2d":
        return {"x": torch.randn(2, 3, 6, 6, generator=g)}
    return {"input_ids": torch.randint(0, 100, (2, 9), generator=g)}


def _out(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out if torch.is_tensor(out) else out.logits


def _loss(model, inputs):
    out = model(**inputs)
    if torch.is_tensor(out):
        return out.square().mean()
    return model(**inputs, labels=inputs["input_ids"]).loss


def _train_peft(make, targets, case):
    pm = peft.get_peft_model(make(), peft.AdaLoraConfig(target_modules=targets, **SCHEDULE))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    inputs = _inputs(case)
    for t in range(10):  # PEFT's documented loop: update_and_allocate after optimizer.step()
        _loss(pm, inputs).backward()
        opt.step()
        pm.base_model.update_and_allocate(t)
        opt.zero_grad()
    return pm.eval()


def _train_ours(make, targets, case):
    model = inject_adalora(make(), AdaLoraConfig(target_modules=targets, **SCHEDULE))
    alloc = RankAllocator(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    inputs = _inputs(case)
    for t in range(1, 11):
        (_loss(model, inputs) + 0.5 * orth_regularizer(alloc.adapters.values())).backward()
        opt.step()
        alloc.step(model, t, opt)
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_loads_in_lorakit(case, tmp_path):
    make, targets = CASES[case]
    pm = _train_peft(make, targets, case)
    inputs = _inputs(case)
    want = _out(pm, inputs)
    pm.save_pretrained(tmp_path / "p")
    ours = lorakit.load_adapter(make(), tmp_path / "p")  # dispatches on peft_type "ADALORA"
    torch.testing.assert_close(_out(ours, inputs), want, rtol=1e-5, atol=1e-5)
    pattern = json.loads((tmp_path / "p" / "adapter_config.json").read_text())["rank_pattern"]
    assert current_ranks(ours) == {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
    assert not any(p.requires_grad for p in ours.parameters())


@pytest.mark.parametrize("case", sorted(CASES))
def test_lorakit_saved_loads_in_peft(case, tmp_path):
    make, targets = CASES[case]
    ours = _train_ours(make, targets, case)
    inputs = _inputs(case)
    want = _out(ours, inputs)
    assert not torch.allclose(want, _out(make(), inputs))  # the adapter does something
    lorakit.save_adapter(ours, tmp_path / "k")
    data = json.loads((tmp_path / "k" / "adapter_config.json").read_text())
    assert data["peft_type"] == "ADALORA" and data["total_step"] == 10
    assert sum(map(sum, data["rank_pattern"].values())) == 2 * len(data["rank_pattern"])
    pm = peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval()
    torch.testing.assert_close(_out(pm, inputs), want, rtol=1e-5, atol=1e-5)
    back = load_adalora(make(), tmp_path / "k")  # and lorakit → lorakit
    torch.testing.assert_close(_out(back, inputs), want, rtol=1e-6, atol=1e-6)
    assert current_ranks(back) == current_ranks(ours)


def test_unallocated_adapter_round_trips(tmp_path, ids):
    model = inject_adalora(tiny_llama(), AdaLoraConfig(target_modules=["q_proj"], init_r=3, target_r=1,
                                                       total_step=5, init_lora_weights=False))
    want = model(input_ids=ids).logits
    save_adalora(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["rank_pattern"] is None
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def _saved(tmp_path):
    model = inject_adalora(tiny_llama(), AdaLoraConfig(target_modules=["q_proj"], init_r=3, target_r=1,
                                                       total_step=5, init_lora_weights=False))
    for ad in svd_adapters(model, "default").values():
        ad.mask_(torch.tensor([True, False, True]))
    lorakit.save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    for key, fn in changes.items():
        cfg[key] = fn(cfg[key])
    (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, error, fix", [
    (dict(rank_pattern=lambda rp: {**rp, "model.layers.7.self_attn.q_proj.lora_E": [True, False, True]}),
     RankPatternError, "no adapted module 'model.layers.7.self_attn.q_proj'"),
    (dict(rank_pattern=lambda rp: {k: v + [True] for k, v in rp.items()}),
     RankPatternError, "saved with another init_r"),
    (dict(rank_pattern=lambda rp: {k: [True, True, True] for k in rp}),
     AdapterFileError, r"file has shape \(2, 32\), model expects \(3, 32\)"),
    (dict(total_step=lambda _: 2, tinit=lambda _: 2), LorakitError, "Raise total_step"),
])
def test_bad_rank_pattern_is_refused_and_model_unchanged(tmp_path, ids, edit, error, fix):
    path = _saved(tmp_path)
    _edit_config(path, **edit)
    model = tiny_llama()
    want = model(input_ids=ids).logits
    with pytest.raises(error, match=fix):
        lorakit.load_adapter(model, path)
    assert not hasattr(model, "_lorakit") or not model._lorakit.adapters
    assert not any(isinstance(m, lorakit.layers.host.LoraLayer) for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)


def test_modules_to_save_and_bias_round_trip_with_peft(tmp_path):
    from conftest import tiny_bert_cls

    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    cfg = AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["query", "value"],
                        modules_to_save=["classifier"], bias="lora_only", init_lora_weights=False)
    model = inject_adalora(tiny_bert_cls(), cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    for ad in svd_adapters(model, "default").values():
        ad.mask_(torch.tensor([True, False, True, True]))
    want = _out(model, {"input_ids": ids})
    lorakit.save_adapter(model, tmp_path / "k")
    pm = peft.PeftModel.from_pretrained(tiny_bert_cls(), tmp_path / "k").eval()
    torch.testing.assert_close(_out(pm, {"input_ids": ids}), want, rtol=1e-5, atol=1e-5)
    pm.save_pretrained(tmp_path / "p")
    back = lorakit.load_adapter(tiny_bert_cls(), tmp_path / "p")
    torch.testing.assert_close(_out(back, {"input_ids": ids}), want, rtol=1e-5, atol=1e-5)
