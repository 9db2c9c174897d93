"""Issue 10.5: ``layers_to_transform`` picks the layer index PEFT picks, on nested paths too
(T5 ``…block.N.layer.M…``: the block index N, not the sub-layer M)."""

import pytest
from peft_models import (
    MODELS,
    adapted_paths,
    assert_close,
    lorakit_config,
    output,
    peft,
    peft_config,
    perturb,
)

import lorakit

# (model, targets, layers_to_transform, layers_pattern)
CASES = {
    "t5": ("t5", ["q", "wo"], [1], None),
    "t5-pattern-block": ("t5", ["q", "v"], [0], "block"),
    "t5-pattern-layer": ("t5", ["q", "v"], [1], ["layer"]),
    "bart": ("bart", ["q_proj", "fc1"], [1], None),
    "whisper": ("whisper", ["k_proj", "fc2"], [0], None),
    "clip": ("clip", ["q_proj", "fc1"], [1], None),
    "vit": ("vit", ["q_proj"], [0], None),
    "llama": ("llama", ["q_proj", "down_proj"], [1], None),
    "llama-pattern": ("llama", ["q_proj"], [0, 1], ["layers"]),
    "phi3": ("phi3", ["qkv_proj", "gate_up_proj"], [0], None),
    "gpt-neox": ("gpt-neox", ["query_key_value", "dense_h_to_4h"], [1], None),
    "gemma2": ("gemma2", ["o_proj"], [1], None),
}


def _kw(case):
    _, targets, layers, pattern = CASES[case]
    kw = dict(target_modules=targets, layers_to_transform=layers)
    if pattern is not None:
        kw["layers_pattern"] = pattern
    return kw


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_modules_as_peft(case):
    make, _ = MODELS[CASES[case][0]]
    ours = lorakit.inject(make(), lorakit_config(**_kw(case)))
    theirs = peft.get_peft_model(make(), peft_config(**_kw(case))).base_model.model
    assert adapted_paths(ours) == adapted_paths(theirs)
    assert adapted_paths(ours)  # something was adapted


def test_t5_picks_the_block_not_the_sub_layer():
    make, _ = MODELS["t5"]
    paths = adapted_paths(lorakit.inject(make(), lorakit_config(target_modules=["q"], layers_to_transform=[1])))
    assert paths == {"encoder.block.1.layer.0.SelfAttention.q", "decoder.block.1.layer.0.SelfAttention.q",
                     "decoder.block.1.layer.1.EncDecAttention.q"}


@pytest.mark.parametrize("case", ["t5", "bart", "phi3", "gpt-neox", "whisper"])
def test_both_directions(case, tmp_path):
    make, inputs = MODELS[CASES[case][0]]
    ours = lorakit.inject(make(), lorakit_config(**_kw(case)))
    perturb(ours)
    want = output(ours, inputs())
    lorakit.save_adapter(ours, tmp_path / "k")
    assert_close(output(peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval(), inputs()), want)
    theirs = peft.get_peft_model(make(), peft_config(**_kw(case))).eval()
    theirs.save_pretrained(tmp_path / "p")
    assert_close(output(lorakit.load_adapter(make(), tmp_path / "p"), inputs()), output(theirs, inputs()))
