import pytest

import lorakit
from lorakit.config import LoraConfig
from lorakit.errors import ConfigError


@pytest.mark.parametrize("kwargs, needle", [
    (dict(r=0, target_modules=["q"]), "r=0"),
    (dict(r=4, lora_alpha=-1, target_modules=["q"]), "lora_alpha"),
    (dict(lora_dropout=1.0, target_modules=["q"]), "lora_dropout"),
    (dict(target_modules=["q"], bias="some"), "bias='some'"),
    (dict(target_modules=["q"], init_lora_weights="pissa_niter_x"), "init_lora_weights"),
    (dict(target_modules=["q"], init_lora_weights="loftq", loftq_config={"loftq_bits": 8}), "loftq_bits"),
    (dict(target_modules=["q"], trainable_token_indices=[-1]), "trainable_token_indices"),
    (dict(target_modules="(unclosed"), "regular expression"),
    (dict(target_modules=["q"], rank_pattern={"q": 0}), "rank_pattern"),
    (dict(target_modules=[]), "non-empty"),
])
def test_bad_config_is_a_lorakit_error(kwargs, needle):
    with pytest.raises(lorakit.LorakitError, match=needle.replace("(", r"\(")):
        LoraConfig(**kwargs)


def test_patterns_and_scaling():
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q"], rank_pattern={"layers\\.1\\.q": 4},
                     alpha_pattern={"q": 32})
    assert cfg.rank_for("model.layers.1.q") == 4
    assert cfg.rank_for("model.layers.11.q") == 8  # the key must match after a '.'
    assert cfg.alpha_for("model.layers.0.q") == 32
    assert cfg.scaling_for("model.layers.1.q") == 32 / 4
    rs = LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q"])
    assert rs.scaling_for("q") == 8 / 4


def test_peft_dict_round_trip_and_unknown_fields_warn():
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["score"])
    data = cfg.to_peft_dict()
    assert data["peft_type"] == "LORA" and data["target_modules"] == ["q_proj", "v_proj"]
    assert LoraConfig.from_peft_dict(data) == cfg
    data["brand_new_field"] = 3
    with pytest.warns(UserWarning, match="brand_new_field"):
        assert LoraConfig.from_peft_dict(data) == cfg
    assert LoraConfig.from_peft_dict({**data, "use_dora": True}).use_dora  # DoRA: adapter_kinds/dora.py
    with pytest.raises(ConfigError, match="lora_bias"):
        LoraConfig.from_peft_dict({**data, "lora_bias": True})
