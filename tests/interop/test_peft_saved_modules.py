"""Issue 10.3, 10.6, 10.7: ``modules_to_save`` as PEFT writes and reads it — SEQ_CLS heads, targets
inside a saved module, and per-row adapter selection of the trainable copies."""

import pytest
import torch
from peft_models import (
    MODELS,
    adapted_paths,
    assert_close,
    lorakit_config,
    output,
    peft,
    peft_config,
    peft_to_ours,
    perturb,
)

import lorakit
from lorakit.errors import TargetNotFoundError
from lorakit.layers.host import LoraLayer
from lorakit.state import model_state

from conftest import tiny_bert_cls

MODELS = {**MODELS, "bert-cls": (lambda seed=0: tiny_bert_cls(seed), MODELS["llama"][1])}
SEQ_CLS = {"llama-cls": ["q_proj", "v_proj"], "bert-cls": ["query", "value"]}
HEAD = {"llama-cls": "score", "bert-cls": "classifier"}


@pytest.mark.parametrize("model", sorted(SEQ_CLS))
def test_peft_seq_cls_adapter_loads(model, tmp_path):
    """PEFT writes modules_to_save=['classifier', 'score'] whatever the model has."""
    make, inputs = MODELS[model]
    theirs = peft.get_peft_model(make(), peft_config(target_modules=SEQ_CLS[model], task_type="SEQ_CLS"))
    ours, want = peft_to_ours(theirs, make, inputs, tmp_path / "p")  # the head copy trains too
    assert_close(output(ours, inputs()), want)
    # what matched is recorded: only the model's own head
    assert model_state(ours).adapters["default"].config.modules_to_save == [HEAD[model]]


@pytest.mark.parametrize("model", sorted(SEQ_CLS))
def test_lorakit_seq_cls_adapter_loads_in_peft(model, tmp_path):
    make, inputs = MODELS[model]
    ours = lorakit.inject(make(), lorakit_config(target_modules=SEQ_CLS[model], task_type="SEQ_CLS",
                                                 modules_to_save=[HEAD[model]]))
    perturb(ours)
    want = output(ours, inputs())
    lorakit.save_adapter(ours, tmp_path / "k")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval()
    assert_close(output(theirs, inputs()), want)


def test_users_own_config_stays_strict():
    make, _ = MODELS["llama-cls"]
    with pytest.raises(TargetNotFoundError, match="classifier"):
        lorakit.inject(make(), lorakit_config(target_modules=["q_proj"], modules_to_save=["classifier", "score"]))


# -- 10.6: never a LoRA target inside a modules_to_save module ------------------------------------------
SAVED_CASES = {
    "bert-pooler": ("bert-cls", dict(target_modules=["dense"], modules_to_save=["pooler", "classifier"])),
    "llama-score-all-linear": ("llama-cls", dict(target_modules="all-linear", modules_to_save=["score"])),
    "vit-classifier": ("vit", dict(target_modules="all-linear", modules_to_save=["classifier"])),
    "llama-mlp": ("llama-cls", dict(target_modules=["q_proj", "down_proj"], modules_to_save=["layers.1.mlp", "score"])),
}


@pytest.mark.parametrize("case", sorted(SAVED_CASES))
def test_targets_inside_saved_modules_are_skipped_like_peft(case, tmp_path):
    model, kw = SAVED_CASES[case]
    make, inputs = MODELS[model]
    ours = lorakit.inject(make(), lorakit_config(**kw))
    theirs = peft.get_peft_model(make(), peft_config(**kw))
    assert adapted_paths(ours) == adapted_paths(theirs.base_model.model)
    for path in kw["modules_to_save"]:
        saved = [m for p, m in ours.named_modules() if p.endswith(path)][0]
        assert not any(isinstance(m, LoraLayer) for m in saved.modules())
    # both directions
    perturb(ours)
    want = output(ours, inputs())
    lorakit.save_adapter(ours, tmp_path / "k")
    assert_close(output(peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval(), inputs()), want)
    perturb(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "p")
    assert_close(output(lorakit.load_adapter(make(), tmp_path / "p"), inputs()), output(theirs, inputs()))


def test_a_target_that_is_itself_saved_is_not_adapted():
    make, _ = MODELS["llama-cls"]
    kw = dict(target_modules=["q_proj", "score"], modules_to_save=["score"])
    ours = lorakit.inject(make(), lorakit_config(**kw))
    assert adapted_paths(ours) == adapted_paths(peft.get_peft_model(make(), peft_config(**kw)).base_model.model)


# -- 10.7: per-row adapters use each row's modules_to_save copy ------------------------------------------
@pytest.mark.parametrize("model", sorted(SEQ_CLS))
def test_per_row_adapters_use_each_rows_copy(model, tmp_path):
    make, inputs = MODELS[model]
    kw = dict(target_modules=SEQ_CLS[model], modules_to_save=[HEAD[model]])
    ours = make()
    for i, name in enumerate(("a", "b")):
        lorakit.inject(ours, lorakit_config(**kw), name)
        lorakit.set_adapter(ours, name)
        perturb(ours, seed=10 + i)
    ids = torch.cat([inputs()["input_ids"]] * 2)[:3]  # 3 rows: a, b, base
    rows = ["a", "b", None]
    with lorakit.per_row_adapters(ours, rows):
        got = output(ours, {"input_ids": ids})
    for name in ("a", "b"):
        lorakit.save_adapter(ours, tmp_path / name, name)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.eval()
    with torch.no_grad():
        want = theirs(input_ids=ids, adapter_names=["a", "b", "__base__"]).logits
    assert_close(got, want)
    # and each row equals the single-adapter forward of its own adapter
    for i, name in enumerate(rows):
        if name is None:
            with lorakit.disabled(ours):
                alone = output(ours, {"input_ids": ids[i:i + 1]})
        else:
            lorakit.set_adapter(ours, name)
            alone = output(ours, {"input_ids": ids[i:i + 1]})
        assert_close(got[i:i + 1], alone)


def test_peft_file_target_names_are_lenient_too(tmp_path):
    """PEFT accepts a target list where only some names match (GPT-NeoX has no ``embed_out`` in
    transformers 5); lorakit reads such a file and records the names that matched."""
    make, inputs = MODELS["gpt-neox"]
    theirs = peft.get_peft_model(make(), peft_config(target_modules=["embed_in", "embed_out", "dense"])).eval()
    theirs.save_pretrained(tmp_path / "p")
    ours = lorakit.load_adapter(make(), tmp_path / "p")
    assert_close(output(ours, inputs()), output(theirs, inputs()))
    assert model_state(ours).adapters["default"].config.target_modules == ["dense", "embed_in"]
    with pytest.raises(TargetNotFoundError, match="embed_out"):  # a user's own config stays strict
        lorakit.inject(make(), lorakit_config(target_modules=["embed_in", "embed_out"]))
