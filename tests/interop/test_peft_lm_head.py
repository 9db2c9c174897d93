"""Issue 10.2 and 10.10: adapters on ``lm_head`` (tied or not, with or without ``embed_tokens``) move
both ways between PEFT and lorakit; merging into a tied weight is refused."""

import warnings

import pytest
import torch
from peft_models import MODELS, assert_close, lorakit_config, output, peft, peft_config, perturb

import lorakit
from lorakit.errors import AdapterStateError, ConfigError

CASES = [(model, targets) for model in ("llama", "llama-tied")
         for targets in (["lm_head"], ["lm_head", "embed_tokens"], ["lm_head", "q_proj"])]




@pytest.mark.parametrize(("model", "targets"), CASES)
def test_peft_saved_loads_in_lorakit(model, targets, tmp_path):
    make, inputs = MODELS[model]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make(), peft_config(target_modules=targets)).eval()
        want = output(theirs, inputs())
        theirs.save_pretrained(tmp_path / "p")
    ours = lorakit.load_adapter(make(), tmp_path / "p")
    assert_close(output(ours, inputs()), want)


@pytest.mark.parametrize(("model", "targets"), CASES)
def test_lorakit_saved_loads_in_peft(model, targets, tmp_path):
    make, inputs = MODELS[model]
    ours = lorakit.inject(make(), lorakit_config(target_modules=targets))
    perturb(ours)
    want = output(ours, inputs())
    lorakit.save_adapter(ours, tmp_path / "k")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval()
    assert_close(output(theirs, inputs()), want)


def test_peft_base_layer_weight_is_copied_like_peft(tmp_path):
    """PEFT saves ``lm_head.base_layer.weight`` (save_embedding_layers) and loads it into the model."""
    make, inputs = MODELS["llama"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make(), peft_config(target_modules=["lm_head"]))
        with torch.no_grad():
            theirs.base_model.model.lm_head.base_layer.weight.mul_(1.5)  # e.g. a resized/trained head
        theirs.save_pretrained(tmp_path / "p")
        want = output(peft.PeftModel.from_pretrained(make(), tmp_path / "p").eval(), inputs())
    assert_close(output(lorakit.load_adapter(make(), tmp_path / "p"), inputs()), want)


def test_ensure_weight_tying_is_refused_by_name(tmp_path):
    make, _ = MODELS["llama-tied"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make(), peft_config(target_modules=["lm_head"], ensure_weight_tying=True))
        theirs.save_pretrained(tmp_path / "p")
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="ensure_weight_tying"):
        lorakit.load_adapter(model, tmp_path / "p")
    assert lorakit.list_adapters(model) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("targets", [["lm_head"], ["lm_head", "embed_tokens"], ["embed_tokens"]])
def test_merging_into_a_tied_weight_is_refused(targets):
    make, inputs = MODELS["llama-tied"]
    model = lorakit.inject(make(), lorakit_config(target_modules=targets))
    want = output(model, inputs())
    weight = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(AdapterStateError, match="tied to .*untie"):
        lorakit.merge(model)
    with pytest.raises(AdapterStateError, match="tied"):
        lorakit.merge_and_unload(model)
    assert torch.equal(model.model.embed_tokens.weight, weight)  # nothing was merged
    assert_close(output(model, inputs()), want)


def test_untied_then_merged_matches_unmerged():
    """The fix the error names: give lm_head its own weight, then merging is exact."""
    make, inputs = MODELS["llama-tied"]
    model = lorakit.inject(make(), lorakit_config(target_modules=["lm_head", "q_proj"]))
    want = output(model, inputs())
    head = model.get_submodule("lm_head")
    head.weight = torch.nn.Parameter(head.weight.detach().clone())  # reaches the base layer
    merged = lorakit.merge_and_unload(model)
    assert_close(output(merged, inputs()), want)


def test_peft_merge_into_tied_weight_changes_the_output():
    """The PEFT quirk lorakit refuses: PEFT merges lm_head's update into the shared weight (with a
    warning at creation), so merged and unmerged outputs differ."""
    make, inputs = MODELS["llama-tied"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make(), peft_config(target_modules=["lm_head"])).eval()
        unmerged = output(theirs, inputs())
        merged = output(theirs.merge_and_unload(), inputs())
    assert (merged - unmerged).abs().max() > 1e-3
