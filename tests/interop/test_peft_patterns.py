"""Issue 10.9: overlapping rank/alpha pattern keys — the most specific key wins whatever the keys'
order, inject warns, and the meaning survives lorakit → lorakit and lorakit → PEFT round trips."""

import json
import warnings

import pytest
from peft_models import MODELS, assert_close, lorakit_config, output, peft, peft_config, perturb

import lorakit
from lorakit.config import pattern_key
from lorakit.state import lora_layers

# q_proj of layer 1 is matched by both rank keys; every v_proj by both alpha keys.
RANK = {"q_proj": 6, "layers.1.self_attn.q_proj": 2}
ALPHA = {".*_proj": 3, "v_proj": 5}
TARGETS = ["q_proj", "v_proj", "o_proj"]


def _inject(rank, alpha):
    make, _ = MODELS["llama"]
    with pytest.warns(UserWarning, match="most specific"):
        return lorakit.inject(make(), lorakit_config(target_modules=TARGETS, rank_pattern=rank, alpha_pattern=alpha))


def _ranks_alphas(model):
    return {p: (h.lora["default"].r, h.lora["default"].alpha) for p, h in lora_layers(model)}


def test_most_specific_key_wins_in_any_order():
    forward = _ranks_alphas(_inject(RANK, ALPHA))
    backward = _ranks_alphas(_inject(dict(reversed(RANK.items())), dict(reversed(ALPHA.items()))))
    assert forward == backward
    # the rule written out
    assert forward["model.layers.1.self_attn.q_proj"] == (2, 3)
    assert forward["model.layers.0.self_attn.q_proj"] == (6, 3)
    assert forward["model.layers.0.self_attn.v_proj"] == (4, 5)
    assert forward["model.layers.1.self_attn.o_proj"] == (4, 3)


@pytest.mark.parametrize("order", ["as-given", "reversed"])
def test_lorakit_round_trip_keeps_the_output(order, tmp_path):
    rank = RANK if order == "as-given" else dict(reversed(RANK.items()))
    ours = _inject(rank, ALPHA)
    perturb(ours)
    make, inputs = MODELS["llama"]
    want = output(ours, inputs())
    lorakit.save_adapter(ours, tmp_path / "k")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file's keys no longer overlap
        again = lorakit.load_adapter(make(), tmp_path / "k")
    assert_close(output(again, inputs()), want)
    # and PEFT reads the same values from the same file
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval()
    assert_close(output(theirs, inputs()), want)


def test_saved_file_has_one_exact_key_per_module(tmp_path):
    ours = _inject(RANK, ALPHA)
    lorakit.save_adapter(ours, tmp_path / "k")
    cfg = json.loads((tmp_path / "k" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {r"^model\.layers\.0\.self_attn\.q_proj$": 6,
                                   r"^model\.layers\.1\.self_attn\.q_proj$": 2}
    assert set(cfg["alpha_pattern"].values()) == {3, 5}


def test_non_overlapping_keys_are_written_as_given(tmp_path):
    make, _ = MODELS["llama"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = lorakit.inject(make(), lorakit_config(target_modules=TARGETS, rank_pattern={"q_proj": 2}))
    lorakit.save_adapter(ours, tmp_path / "k")
    assert json.loads((tmp_path / "k" / "adapter_config.json").read_text())["rank_pattern"] == {"q_proj": 2}


def test_peft_file_with_overlapping_keys_loads_as_peft_computed(tmp_path):
    """PEFT picks the first matching key in dict order; when the user put the most specific key first,
    PEFT's model is the one lorakit's rule describes, and lorakit loads it with the same output."""
    make, inputs = MODELS["llama"]
    kw = dict(target_modules=TARGETS, rank_pattern={"layers.1.self_attn.q_proj": 2, "q_proj": 6},
              alpha_pattern={"v_proj": 5, ".*_proj": 3})
    theirs = peft.get_peft_model(make(), peft_config(**kw)).eval()
    theirs.save_pretrained(tmp_path / "p")
    with pytest.warns(UserWarning, match="most specific"):
        ours = lorakit.load_adapter(make(), tmp_path / "p")
    assert_close(output(ours, inputs()), output(theirs, inputs()))


def test_pattern_key_examples():
    path = "model.layers.1.self_attn.q_proj"
    assert pattern_key({"q_proj": 1, "layers.1.self_attn.q_proj": 2}, path) == "layers.1.self_attn.q_proj"
    assert pattern_key({".*_proj": 1, "q_proj": 2}, path) == "q_proj"
    assert pattern_key({"k_proj": 1}, path) is None
    assert pattern_key({"q_.*": 1, ".*proj": 2}, path) == ".*proj"  # 4 literal characters beat 2
    assert pattern_key({"q_pro.": 1, "q_pr.j": 2}, path) == "q_pr.j"  # a tie: the smaller key text
