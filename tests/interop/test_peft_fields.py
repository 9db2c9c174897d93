"""Issue 10.8: every field of PEFT's LoraConfig has a decision; features lorakit does not implement
are refused by name (never loaded with wrong outputs, never "unexpected tensor")."""

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft_models import MODELS, assert_close, output, peft, peft_config

import lorakit
from lorakit.errors import ConfigError
from lorakit.peft_fields import INIT_DECISIONS, PEFT_FIELDS

DOCS = Path(__file__).resolve().parents[2] / "docs" / "PEFT_FIELDS.md"


def test_every_peft_field_has_a_decision():
    peft_fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert peft_fields - set(PEFT_FIELDS) == set(), "a PEFT LoraConfig field without a lorakit decision"
    for name, d in PEFT_FIELDS.items():
        assert d.status in ("implemented", "ignored", "refused") and d.reason, name
        assert d.status != "refused" or d.feature, name


def test_docs_table_lists_every_field_with_its_decision():
    text = DOCS.read_text(encoding="utf-8")
    for name, d in PEFT_FIELDS.items():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row is not None, f"{name} missing from {DOCS.name}"
        assert d.status in row, f"{name}: docs say {row!r}, the table says {d.status}"
    for value, d in INIT_DECISIONS.items():
        row = next((line for line in text.splitlines() if line.startswith(f'| `"{value}"`')), None)
        assert row is not None and d.status in row, value


def _features():
    from peft.tuners.lora.config import BdLoraConfig, KasaConfig, VeloraConfig

    return {
        "alora_invocation_tokens": dict(alora_invocation_tokens=[3, 4], task_type="CAUSAL_LM"),
        "layer_replication": dict(layer_replication=[[0, 2], [1, 2]]),
        "kasa_config": dict(kasa_config=KasaConfig()),
        "velora_config": dict(velora_config=VeloraConfig()),
        "use_bdlora": dict(use_bdlora=BdLoraConfig(match_strict=False)),
        "lora_bias": dict(lora_bias=True),
    }


FEATURES = sorted(_features()) if peft else []


@pytest.mark.parametrize("feature", FEATURES)
def test_peft_feature_is_refused_by_name(feature, tmp_path):
    make, _ = MODELS["llama"]
    kw = {"target_modules": ["q_proj", "v_proj"], **_features()[feature]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(make(), peft_config(**kw)).save_pretrained(tmp_path / "p")
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=feature.split("=")[0]) as info:
        lorakit.load_adapter(model, tmp_path / "p")
    assert "unexpected tensor" not in str(info.value)
    assert lorakit.list_adapters(model) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _edit_config(path: Path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.fixture
def plain_peft_dir(tmp_path):
    make, inputs = MODELS["llama"]
    theirs = peft.get_peft_model(make(), peft_config(target_modules=["q_proj"])).eval()
    theirs.save_pretrained(tmp_path / "p")
    return tmp_path / "p", output(theirs, inputs())


@pytest.mark.parametrize(("field", "value"), [
    ("arrow_config", {"top_k": 2}), ("monteclora_config", {"n_samples": 4}), ("use_qalora", True),
    ("init_lora_weights", "corda"), ("init_lora_weights", "lora_ga"),
])
def test_refusals_from_the_config_alone(plain_peft_dir, field, value):
    path, _ = plain_peft_dir
    _edit_config(path, **{field: value})
    with pytest.raises(ConfigError, match=field):
        lorakit.load_adapter(MODELS["llama"][0](), path)


@pytest.mark.parametrize(("field", "value"), [
    ("init_lora_weights", "eva"), ("init_lora_weights", "orthogonal"), ("init_lora_weights", "mica"),
    ("runtime_config", {"ephemeral_gpu_offload": False}), ("megatron_core", "megatron.core"),
    ("qalora_group_size", 32), ("eva_config", {"rho": 2.0}),
])
def test_ignored_fields_load_with_the_same_output(plain_peft_dir, field, value):
    path, want = plain_peft_dir
    _edit_config(path, **{field: value})
    make, inputs = MODELS["llama"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ignored on purpose: no warning either
        model = lorakit.load_adapter(make(), path)
    assert_close(output(model, inputs()), want)


def test_unknown_field_warns_and_loads(plain_peft_dir):
    path, want = plain_peft_dir
    _edit_config(path, some_future_field={"x": 1})
    make, inputs = MODELS["llama"]
    with pytest.warns(UserWarning, match="some_future_field"):
        model = lorakit.load_adapter(make(), path)
    assert_close(output(model, inputs()), want)


def test_unknown_init_value_is_refused(plain_peft_dir):
    path, _ = plain_peft_dir
    _edit_config(path, init_lora_weights="warp")
    with pytest.raises(ConfigError, match="init_lora_weights='warp'"):
        lorakit.load_adapter(MODELS["llama"][0](), path)
