"""Architectures found by the PEFT ↔ lorakit sweep over transformers' causal-LM and sequence-classification
model types (a scratch script, see the report of branch ``archsweep``): the ones lorakit got wrong, and a
representative few that pass and that ``test_peft_archs.py`` does not cover.

Each case builds a tiny random-init model (hidden 32, 2 layers, vocab 100), lets PEFT adapt it with
``target_modules="all-linear"`` (random A and B) and compares PEFT's own logits with lorakit's on the same
file, both ways.

* BEAM with dense MLPs only: PEFT (transformers 5) moves the MoE names of all-linear into
  ``target_parameters`` for the model type and saves them although they match nothing; PEFT loads such a
  file, and so must lorakit (it refused with TargetNotFoundError).
* DeepSeek-V4's ``o_a_proj`` is an ``nn.Linear`` subclass computing a block-diagonal grouped product
  ((…, g, d_g) out of a (g·d_g, in/g) weight): no LoRA update of its weight fits its output. lorakit
  raised a raw RuntimeError from the branch's GEMM; now an UnsupportedModuleError naming the class.
"""

import peft_models as pm
import pytest
import torch
from peft_models import (
    VOCAB,
    _ids,
    _seeded,
    adapted_paths,
    assert_close,
    lorakit_config,
    output,
    peft,
    peft_config,
)

import lorakit
from lorakit.errors import TargetNotFoundError, UnsupportedModuleError
from lorakit.state import model_state

T = pm.transformers
_DEC = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=64)
_MOE = dict(_DEC, num_experts_per_tok=2)
_BEAM = dict(_MOE, head_dim=8, moe_intermediate_size=16, num_experts=4, n_group=1, topk_group=1,
             layer_types=["sliding_attention", "full_attention"])

# name: (model class, config class, config kwargs)
SPECS = {
    "beam-dense": ("BeamForCausalLM", "BeamConfig", dict(_BEAM, mlp_layer_types=["dense", "dense"])),
    "beam-moe": ("BeamForCausalLM", "BeamConfig", dict(_BEAM, mlp_layer_types=["dense", "sparse"])),
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", dict(_MOE, num_experts=4, eos_token_id=2)),
    "granitemoe": ("GraniteMoeForCausalLM", "GraniteMoeConfig", dict(_MOE, num_local_experts=4)),
    "jetmoe": ("JetMoeForCausalLM", "JetMoeConfig", dict(_MOE, kv_channels=8, num_local_experts=4)),
    "gpt_neo": ("GPTNeoForCausalLM", "GPTNeoConfig", dict(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32,
                                                          num_layers=2, num_heads=4, bos_token_id=2, eos_token_id=2,
                                                          attention_types=[[["global", "local"], 1]])),
    "biogpt": ("BioGptForCausalLM", "BioGptConfig", dict(_DEC)),
    "bitnet": ("BitNetForCausalLM", "BitNetConfig", dict(_DEC, bos_token_id=2, eos_token_id=2)),
    "xglm": ("XGLMForCausalLM", "XGLMConfig", dict(vocab_size=VOCAB, max_position_embeddings=64, d_model=32,
                                                   ffn_dim=64, num_layers=2, attention_heads=4)),
    "ctrl": ("CTRLLMHeadModel", "CTRLConfig", dict(vocab_size=VOCAB, n_positions=64, n_embd=32, dff=64, n_layer=2,
                                                   n_head=4)),
    "cohere": ("CohereForCausalLM", "CohereConfig", dict(_DEC, eos_token_id=2)),
    "ernie4_5": ("Ernie4_5ForCausalLM", "Ernie4_5Config", dict(_DEC)),
}


def _make(name):
    model_cls, config_cls, kw = SPECS[name]
    if not hasattr(T, model_cls):
        pytest.skip(f"this transformers has no {model_cls}")
    return _seeded(lambda: getattr(T, model_cls)(getattr(T, config_cls)(**kw)))


def _inputs():
    return {"input_ids": _ids(), "use_cache": False}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_peft_saved_loads_in_lorakit(name, tmp_path):
    make = _make(name)
    theirs = peft.get_peft_model(make(), peft_config(target_modules="all-linear")).eval()
    want = output(theirs, _inputs())
    assert not torch.allclose(want, output(make(), _inputs()), atol=1e-4), "the adapter does not change the output"
    theirs.save_pretrained(tmp_path / "p")
    ours = lorakit.load_adapter(make(), tmp_path / "p")
    assert_close(output(ours, _inputs()), want)
    assert adapted_paths(ours) == adapted_paths(theirs.base_model.model)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_lorakit_saved_loads_in_peft(name, tmp_path):
    make = _make(name)
    ours = lorakit.inject(make(), lorakit_config(target_modules="all-linear"))
    want = output(ours, _inputs())
    lorakit.save_adapter(ours, tmp_path / "k")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval()
    assert_close(output(theirs, _inputs()), want)
    assert adapted_paths(theirs.base_model.model) == adapted_paths(ours)


def test_unmatched_target_parameters_of_a_peft_file_are_dropped(tmp_path):
    """BEAM with dense MLPs: PEFT's file names MoE target_parameters that match nothing; lorakit records
    only what matched — but a user's own config naming a missing parameter is still refused."""
    make = _make("beam-dense")
    theirs = peft.get_peft_model(make(), peft_config(target_modules="all-linear"))
    theirs.save_pretrained(tmp_path / "p")
    raw = (tmp_path / "p" / "adapter_config.json").read_text()
    assert "target_parameters" in raw and "gate_up_proj" in raw  # the file really holds them (PEFT's conversion)
    ours = lorakit.load_adapter(make(), tmp_path / "p")
    assert model_state(ours).adapters["default"].config.target_parameters is None
    with pytest.raises(TargetNotFoundError, match="gate_up_proj"):
        lorakit.inject(make(), lorakit_config(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj"]))


_V4 = dict(vocab_size=VOCAB, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=1, head_dim=8, q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=4,
           n_shared_experts=1, max_position_embeddings=64, qk_rope_head_dim=4,
           layer_types=["heavily_compressed_attention", "compressed_sparse_attention"], mlp_layer_types=["hash_moe", "moe"])


def _v4():
    if not hasattr(T, "DeepseekV4ForCausalLM"):
        pytest.skip("this transformers has no DeepseekV4ForCausalLM")
    return _seeded(lambda: T.DeepseekV4ForCausalLM(T.DeepseekV4Config(**_V4)))


def test_grouped_linear_subclass_is_refused_by_name():
    """DeepSeek-V4's o_a_proj (nn.Linear subclass, block-diagonal product): an UnsupportedModuleError that
    names the class and the way out, not a raw shape error from the GEMM."""
    make = _v4()
    ours = lorakit.inject(make(), lorakit_config(target_modules=["o_a_proj"]))
    with pytest.raises(UnsupportedModuleError, match="DeepseekV4GroupedLinear.*out_features.*exclude_modules"):
        output(ours, _inputs())


def test_grouped_linear_excluded_matches_peft(tmp_path):
    """The refusal's advice works: all-linear without o_a_proj agrees with PEFT both ways."""
    make = _v4()
    theirs = peft.get_peft_model(make(), peft_config(target_modules="all-linear", exclude_modules=["o_a_proj"])).eval()
    want = output(theirs, _inputs())
    theirs.save_pretrained(tmp_path / "p")
    ours = lorakit.load_adapter(make(), tmp_path / "p")
    assert_close(output(ours, _inputs()), want)
    lorakit.save_adapter(ours, tmp_path / "k")
    back = peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval()
    assert_close(output(back, _inputs()), want)
