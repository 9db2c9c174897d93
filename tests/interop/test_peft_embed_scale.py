"""Issue 10.4: embeddings that scale their rows in forward (Gemma's √d, BART with scale_embedding)
scale the LoRA branch too — unmerged = merged = PEFT."""

import pytest
import torch
import torch.nn.functional as F
from peft_models import MODELS, assert_close, lorakit_config, output, peft, peft_config, perturb
from torch import nn

import lorakit
from lorakit.errors import AdapterStateError, UnsupportedModuleError

SCALED = {"gemma": ["embed_tokens", "q_proj"], "gemma2": ["embed_tokens", "o_proj"], "bart": ["embed_tokens"]}


def _untied(make):
    # Gemma ties lm_head to embed_tokens; untie so that merging the embedding is allowed (and exact).
    def build():
        model = make()
        head = model.get_output_embeddings()
        head.weight = nn.Parameter(head.weight.detach().clone())
        return model
    return build


@pytest.mark.parametrize("model", sorted(SCALED))
def test_peft_saved_loads_in_lorakit(model, tmp_path):
    make, inputs = MODELS[model]
    theirs = peft.get_peft_model(make(), peft_config(target_modules=SCALED[model])).eval()
    want = output(theirs, inputs())
    theirs.save_pretrained(tmp_path / "p")
    assert_close(output(lorakit.load_adapter(make(), tmp_path / "p"), inputs()), want)


@pytest.mark.parametrize("model", sorted(SCALED))
def test_lorakit_saved_loads_in_peft(model, tmp_path):
    make, inputs = MODELS[model]
    ours = lorakit.inject(make(), lorakit_config(target_modules=SCALED[model]))
    perturb(ours)
    want = output(ours, inputs())
    lorakit.save_adapter(ours, tmp_path / "k")
    assert_close(output(peft.PeftModel.from_pretrained(make(), tmp_path / "k").eval(), inputs()), want)


@pytest.mark.parametrize("model", ["gemma", "gemma2"])
def test_merge_keeps_the_output(model):
    make, inputs = MODELS[model]
    ours = lorakit.inject(_untied(make)(), lorakit_config(target_modules=SCALED[model]))
    want = output(ours, inputs())
    assert_close(output(lorakit.merge_and_unload(ours), inputs()), want)


def test_bart_shared_embedding_merge_is_refused():
    """BART's encoder and decoder embed_tokens share one weight: two updates would be summed into it."""
    make, _ = MODELS["bart"]
    ours = lorakit.inject(make(), lorakit_config(target_modules=["embed_tokens"]))
    with pytest.raises(AdapterStateError, match="tied to .*shared"):
        lorakit.merge(ours)


def test_gemma_branch_matches_naive_formula():
    """embed(ids) = √d · (W + s·(BA)ᵀ)[ids], written out."""
    make, _ = MODELS["gemma"]
    ours = lorakit.inject(make(), lorakit_config(target_modules=["embed_tokens"]))
    host = ours.model.embed_tokens
    ad = host.lora["default"]
    ids = torch.tensor([[1, 5, 7]])
    w = host.weight + (ad.lora_B @ ad.lora_A).T * (8 / 4)
    want = F.embedding(ids, w) * (32 ** 0.5)
    assert_close(host(ids), want)


class _Shifted(nn.Embedding):
    def forward(self, ids):  # not a scale: LoRA cannot follow it
        return super().forward(ids) + 1.0


class _Plain(nn.Embedding):
    def forward(self, ids):  # overrides forward but changes nothing
        return super().forward(ids)


def test_embedding_that_transforms_rows_is_refused_by_name():
    model = nn.Sequential(_Shifted(10, 4))
    with pytest.raises(UnsupportedModuleError, match="_Shifted"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["0"]))
    assert isinstance(model[0], _Shifted)  # nothing was wrapped


def test_embedding_subclass_with_plain_forward_is_accepted():
    model = lorakit.inject(nn.Sequential(_Plain(10, 4)), lorakit.LoraConfig(target_modules=["0"], init_lora_weights=False))
    ad = model[0].lora["default"]
    ids = torch.tensor([1, 2])
    assert_close(model(ids), F.embedding(ids, model[0].weight + (ad.lora_B @ ad.lora_A).T * ad.scaling))
