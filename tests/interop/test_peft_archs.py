"""Adapters move both ways between PEFT and lorakit on many more transformers architectures
(``peft_archs.ARCHS``): PEFT's default targets (``target_modules=None``), ``"all-linear"``, conv
layers, MoE expert parameters, and DoRA / rsLoRA / patterns / modules_to_save on a representative few.

Each case compares outputs of the PEFT model and the lorakit model holding the same adapter (PEFT is the
independent reference), and checks that the adapter changes the base model's output.
"""

import functools

import peft_models as pm
import pytest
import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
from peft_archs import ARCHS, MODEL_TYPES
from peft_models import adapted_paths, assert_close, lorakit_config, output, peft, peft_config, perturb

import lorakit
from lorakit.errors import ConfigError, TargetNotFoundError, UnsupportedModuleError
from lorakit.state import model_state

# Extra explicit targets where "all-linear" misses a layer kind worth checking (Conv2d / Conv1d), and
# Mamba, whose all-linear set PEFT refuses (its fused kernels read out_proj / conv1d).
EXPLICIT = {
    "swin": ["projection", "q_proj", "v_proj"],
    "convnext": ["patch_embeddings", "pwconv1", "pwconv2"],
    "wav2vec2-cls": ["conv_layers.0.conv", "conv_layers.1.conv", "feature_projection.projection", "q_proj"],
    "mamba": ["in_proj", "x_proj", "dt_proj"],
}
# PEFT 0.21 with transformers 5 turns target_modules=None into an empty set on MoE model types before
# it looks its default table up (convert_peft_config_for_transformers runs first), then fails.
PEFT_DEFAULT_BROKEN = {"mixtral"}


def _cases():
    out = []
    for name in sorted(ARCHS):
        # default targets both ways where they are not just q_proj/v_proj (llama-likes: qwen2 stands for all;
        # test_default_targets_are_peft_defaults checks the resolution on every one)
        default = PEFT_DEFAULTS.get(MODEL_TYPES[name])
        if default is not None and (sorted(default) != ["q_proj", "v_proj"] or name == "qwen2"):
            out.append((name, "default"))
        out.append((name, "all-linear" if name != "mamba" else "explicit"))
        if name in EXPLICIT and name != "mamba":
            out.append((name, "explicit"))
    return out


CASES = _cases()


def _targets(name, which):
    return {"default": None, "all-linear": "all-linear", "explicit": EXPLICIT.get(name)}[which]


@functools.cache
def _base_output(name):
    make, inputs = ARCHS[name]
    return output(make(), inputs())


def _differs(a, b):
    assert not torch.allclose(a, b, rtol=1e-4, atol=1e-4), "the adapter does not change the output"


@pytest.mark.parametrize("name, which", CASES, ids=[f"{n}-{w}" for n, w in CASES])
def test_peft_saved_loads_in_lorakit(name, which, tmp_path):
    if which == "default" and name in PEFT_DEFAULT_BROKEN:
        pytest.skip("PEFT 0.21 + transformers 5 cannot build target_modules=None for this MoE type")
    make, inputs = ARCHS[name]
    theirs = peft.get_peft_model(make(), peft_config(target_modules=_targets(name, which))).eval()
    want = output(theirs, inputs())
    _differs(want, _base_output(name))
    theirs.save_pretrained(tmp_path / "p")
    ours = lorakit.load_adapter(make(), tmp_path / "p")
    assert_close(output(ours, inputs()), want)
    assert adapted_paths(ours) == adapted_paths(theirs.base_model.model)


@pytest.mark.parametrize("name, which", CASES, ids=[f"{n}-{w}" for n, w in CASES])
def test_lorakit_saved_loads_in_peft(name, which, tmp_path):
    make, inputs = ARCHS[name]
    ours = lorakit.inject(make(), lorakit_config(target_modules=_targets(name, which)))
    perturb(ours)
    want = output(ours, inputs())
    _differs(want, _base_output(name))
    lorakit.save_adapter(ours, tmp_path / "k")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval()
    assert_close(output(theirs, inputs()), want)
    assert adapted_paths(theirs.base_model.model) == adapted_paths(ours)


@pytest.mark.parametrize("name", sorted(n for n in ARCHS if MODEL_TYPES[n] in PEFT_DEFAULTS))
def test_default_targets_are_peft_defaults(name):
    """target_modules=None adapts what PEFT's table names for the model type, and is recorded resolved."""
    make, _ = ARCHS[name]
    ours = lorakit.inject(make(), lorakit_config(target_modules=None))
    want = PEFT_DEFAULTS[MODEL_TYPES[name]]
    assert model_state(ours).adapters["default"].config.target_modules == sorted(want)
    assert {p.rpartition(".")[2] for p in adapted_paths(ours)} == set(want)


# -- variants on a representative few ------------------------------------------------------------
VARIANTS = {
    "dora": lambda targets: dict(use_dora=True),
    # per-module rank and alpha: the first target gets r=2, the last α=3
    "rslora-patterns": lambda targets: dict(use_rslora=True, r=4, lora_alpha=6, rank_pattern={targets[0]: 2},
                                            alpha_pattern={targets[-1]: 3}),
}
VARIANT_MODELS = {  # arch: targets (fused qkv, GPT-style, encoder, conv, seq2seq)
    "bloom": ["query_key_value", "dense_4h_to_h"],
    "gpt_bigcode": ["c_attn", "c_fc"],
    "mpt": ["Wqkv", "up_proj"],
    "phi": ["q_proj", "dense", "fc1"],
    "deberta-v2-cls": ["query_proj", "value_proj"],
    "mbart": ["q_proj", "fc1"],
    "swin": ["projection", "q_proj"],
    "qwen2": ["q_proj", "down_proj"],
}
VARIANT_CASES = [(m, v) for m in sorted(VARIANT_MODELS) for v in sorted(VARIANTS)]


def _variant_kw(model, variant):
    targets = VARIANT_MODELS[model]
    return dict(target_modules=targets, **VARIANTS[variant](targets))


@pytest.mark.parametrize("model, variant", VARIANT_CASES, ids=[f"{m}-{v}" for m, v in VARIANT_CASES])
def test_variants_both_ways(model, variant, tmp_path):
    make, inputs = ARCHS[model]
    kw = _variant_kw(model, variant)
    theirs = peft.get_peft_model(make(), peft_config(**kw))
    perturb(theirs)  # DoRA's magnitude too
    theirs.eval()
    want = output(theirs, inputs())
    _differs(want, _base_output(model))
    theirs.save_pretrained(tmp_path / "p")
    ours = lorakit.load_adapter(make(), tmp_path / "p")
    assert_close(output(ours, inputs()), want)
    mine = lorakit.inject(make(), lorakit_config(**kw))
    perturb(mine, seed=11)
    want = output(mine, inputs())
    lorakit.save_adapter(mine, tmp_path / "k")
    assert_close(output(peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval(), inputs()), want)


# -- sequence-classification heads: modules_to_save ----------------------------------------------
HEADS = {  # model: (targets, head module)
    "qwen2-cls": (["q_proj", "v_proj"], "score"),
    "roberta-cls": (["query", "value"], "classifier"),
    "distilbert-cls": (["q_lin", "v_lin"], "classifier"),
    "electra-cls": (["query", "value"], "classifier"),
    "deberta-v2-cls": (["query_proj", "value_proj"], "classifier"),
    "swin": (["q_proj", "v_proj"], "classifier"),
    "wav2vec2-cls": (["q_proj", "v_proj"], "classifier"),
}


@pytest.mark.parametrize("model", sorted(HEADS))
def test_seq_cls_head_both_ways(model, tmp_path):
    make, inputs = ARCHS[model]
    targets, head = HEADS[model]
    # PEFT's SEQ_CLS wrapper passes input_ids: vision/audio models name their head instead
    task = dict(task_type="SEQ_CLS") if "input_ids" in inputs() else dict(modules_to_save=[head])
    theirs = peft.get_peft_model(make(), peft_config(target_modules=targets, **task))
    ours, want = pm.peft_to_ours(theirs, make, inputs, tmp_path / "p")  # the head copy trains too
    assert_close(output(ours, inputs()), want)
    # PEFT copies every module whose path ends with the name: DistilBERT's pre_classifier too
    also = ["pre_classifier"] if model == "distilbert-cls" else []
    assert model_state(ours).adapters["default"].config.modules_to_save == [head, *also]
    mine = lorakit.inject(make(), lorakit_config(target_modules=targets, modules_to_save=[head]))
    perturb(mine, seed=11)
    want = output(mine, inputs())
    lorakit.save_adapter(mine, tmp_path / "k")
    assert_close(output(peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval(), inputs()), want)


# -- MoE experts: target_parameters ---------------------------------------------------------------
MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.mark.parametrize("model", MOE)
def test_moe_expert_parameters_both_ways(model, tmp_path):
    make, inputs = ARCHS[model]
    kw = dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    theirs = peft.get_peft_model(make(), peft_config(**kw)).eval()
    want = output(theirs, inputs())
    theirs.save_pretrained(tmp_path / "p")
    assert_close(output(lorakit.load_adapter(make(), tmp_path / "p"), inputs()), want)
    mine = lorakit.inject(make(), lorakit_config(**kw))
    perturb(mine)
    want = output(mine, inputs())
    _differs(want, _base_output(model))
    lorakit.save_adapter(mine, tmp_path / "k")
    assert_close(output(peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval(), inputs()), want)


def _qwen3_moe_with_dense_layer():
    make, inputs = ARCHS["qwen3_moe"]
    return (lambda: make(mlp_only_layers=[0])), inputs  # layer 0: a dense MLP (gate/up/down_proj Linear)


def test_moe_all_linear_leaves_out_dense_names_peft_rewrites(tmp_path):
    """PEFT (transformers 5) reads 'down_proj' on qwen3_moe as the experts' parameter, so a lorakit file
    adapting the dense layer-0 down_proj loaded in PEFT gave other outputs; all-linear now skips it."""
    make, inputs = _qwen3_moe_with_dense_layer()
    with pytest.warns(UserWarning, match="down_proj"):
        ours = lorakit.inject(make(), lorakit_config(target_modules="all-linear"))
    assert not any(p.endswith("mlp.down_proj") for p in adapted_paths(ours))
    perturb(ours)
    want = output(ours, inputs())
    lorakit.save_adapter(ours, tmp_path / "k")
    assert_close(output(peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval(), inputs()), want)


def test_moe_dense_name_peft_rewrites_is_refused_by_name():
    make, _ = _qwen3_moe_with_dense_layer()
    model = make()
    with pytest.raises(UnsupportedModuleError, match=r"model\.layers\.0\.mlp\.down_proj.*target_parameters"):
        lorakit.inject(model, lorakit_config(target_modules=["q_proj", "down_proj"]))
    assert model_state(model) is None  # untouched


@pytest.mark.parametrize("name, param", [("down_proj", "experts.down_proj"), ("gate_proj", "experts.gate_up_proj")])
def test_expert_weight_named_as_module_points_to_target_parameters(name, param):
    make, _ = ARCHS["qwen3_moe"]
    with pytest.raises(TargetNotFoundError, match=rf"target_parameters=\['{param}'\]"):
        lorakit.inject(make(), lorakit_config(target_modules=["q_proj", name]))


# -- Mamba: modules its fused kernels read are refused (as PEFT) -----------------------------------
@pytest.mark.parametrize("target", ["out_proj", "conv1d"])
def test_mamba_kernel_read_modules_are_refused(target):
    make, _ = ARCHS["mamba"]
    model = make()
    with pytest.raises(UnsupportedModuleError, match=rf"mixer\.{target}'.*fused kernels.*Remove '{target}'"):
        lorakit.inject(model, lorakit_config(target_modules=["in_proj", target]))
    assert model_state(model) is None


def test_mamba_all_linear_skips_them_and_peft_reads_the_file(tmp_path):
    make, inputs = ARCHS["mamba"]
    with pytest.warns(UserWarning, match="out_proj"):
        ours = lorakit.inject(make(), lorakit_config(target_modules="all-linear"))
    assert {p.rpartition(".")[2] for p in adapted_paths(ours)} == {"in_proj", "x_proj", "dt_proj"}
    perturb(ours)
    want = output(ours, inputs())
    lorakit.save_adapter(ours, tmp_path / "k")
    assert_close(output(peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval(), inputs()), want)


def test_no_default_targets_for_the_model_type_is_a_config_error():
    make, _ = ARCHS["mamba"]
    with pytest.raises(ConfigError, match="model_type 'mamba' has no default targets"):
        lorakit.inject(make(), lorakit_config(target_modules=None))


# -- SEQ_CLS heads and lm_head biases -------------------------------------------------------------
@pytest.mark.parametrize("model", ["roberta-cls", "qwen2-cls", "deberta-v2-cls"])
def test_seq_cls_all_linear_both_ways(model, tmp_path):
    """task_type="SEQ_CLS" makes the head a trained copy (PEFT adds classifier/score to modules_to_save),
    so nothing inside it (RoBERTa's classifier.dense) is a LoRA target, and PEFT finds the head's tensors
    in lorakit's file (it raised KeyError before)."""
    make, inputs = ARCHS[model]
    kw = dict(target_modules="all-linear", task_type="SEQ_CLS")
    ours = lorakit.inject(make(), lorakit_config(**kw))
    assert model_state(ours).adapters["default"].config.modules_to_save == [HEADS[model][1]]
    assert adapted_paths(ours) == adapted_paths(peft.get_peft_model(make(), peft_config(**kw)).base_model.model)
    perturb(ours)
    want = output(ours, inputs())
    lorakit.save_adapter(ours, tmp_path / "k")
    assert_close(output(peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval(), inputs()), want)


@pytest.mark.parametrize("model, targets", [("gptj", ["wte", "lm_head"]), ("phi", ["embed_tokens", "lm_head"])])
def test_peft_saved_lm_head_bias_loads(model, targets, tmp_path):
    """PEFT saves lm_head.base_layer.bias next to its weight when lm_head has a bias (GPT-J, Phi)."""
    make, inputs = ARCHS[model]
    theirs = peft.get_peft_model(make(), peft_config(target_modules=targets))
    perturb(theirs)
    theirs.eval()
    want = output(theirs, inputs())
    theirs.save_pretrained(tmp_path / "p")
    assert_close(output(lorakit.load_adapter(make(), tmp_path / "p"), inputs()), want)


# -- a Linear subclass that is not a linear map: Phi-MoE's router returns a tuple ---------------------
def _phimoe():
    from peft_archs import _MOE, _build
    from peft_models import _seeded

    kw = {k: v for k, v in _MOE.items() if k not in ("num_experts", "moe_intermediate_size")}
    return _seeded(_build("PhimoeForCausalLM", "PhimoeConfig", num_local_experts=4, **kw))


def test_router_returning_a_tuple_is_a_lorakit_error_naming_it(tmp_path):
    make, inputs = _phimoe(), ARCHS["qwen2"][1]
    ours = lorakit.inject(make(), lorakit_config(target_modules="all-linear"))  # PEFT's all-linear fails alike
    with pytest.raises(UnsupportedModuleError, match="PhimoeTopKRouter returned a tuple.*exclude_modules"):
        output(ours, inputs())
    ours = lorakit.inject(make(), lorakit_config(target_modules="all-linear", exclude_modules=["router"]))
    perturb(ours)
    want = output(ours, inputs())
    lorakit.save_adapter(ours, tmp_path / "k")
    assert_close(output(peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval(), inputs()), want)


# -- merging: lorakit's merged model equals PEFT's merged model -----------------------------------
MERGE = {"bloom": dict(target_modules=["query_key_value", "dense_4h_to_h"], use_dora=True),
         "swin": dict(target_modules=["projection", "q_proj"]),
         "qwen3_moe": dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"])}


@pytest.mark.parametrize("model", sorted(MERGE))
def test_merge_matches_peft_merge(model, tmp_path):
    make, inputs = ARCHS[model]
    ours = lorakit.inject(make(), lorakit_config(**MERGE[model]))
    perturb(ours)
    lorakit.save_adapter(ours, tmp_path / "k")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval().merge_and_unload()
    assert_close(output(lorakit.merge_and_unload(ours), inputs()), output(theirs, inputs()))


def test_transformers4_per_expert_file_is_refused_by_name(tmp_path):
    """A Mixtral adapter saved on transformers 4 (experts.N.w1 layers) cannot fit the stacked experts."""
    import json

    from safetensors.torch import save_file

    from lorakit.errors import AdapterFileError

    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "w1"]}))
    pre = "base_model.model.model.layers.0."
    save_file({f"{pre}self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
               f"{pre}self_attn.q_proj.lora_B.weight": torch.zeros(32, 4),
               f"{pre}block_sparse_moe.experts.0.w1.lora_A.weight": torch.zeros(4, 32),
               f"{pre}block_sparse_moe.experts.0.w1.lora_B.weight": torch.zeros(64, 4)},
              str(tmp_path / "adapter_model.safetensors"))
    model = ARCHS["mixtral"][0]()
    with pytest.raises(AdapterFileError, match=r"\['w1'\] are per-expert Linear layers of transformers 4.*gate_up_proj"):
        lorakit.load_adapter(model, tmp_path)
    assert model_state(model) is None


def test_seq_cls_head_already_saved_is_not_added_again():
    make, _ = ARCHS["qwen2-cls"]
    ours = lorakit.inject(make(), lorakit_config(target_modules=["q_proj"], task_type="SEQ_CLS", modules_to_save=["score"]))
    assert model_state(ours).adapters["default"].config.modules_to_save == ["score"]
