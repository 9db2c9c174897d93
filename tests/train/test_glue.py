"""GLUE-format files → classification rows, and the paper's RoBERTa q/v LoRA run through `lorakit train`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lorakit.data.files import read_data
from lorakit.errors import DataError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "glue_roberta_lora.py"


def _example():
    spec = importlib.util.spec_from_file_location("glue_roberta_lora", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sst2_tsv_keeps_quotes_literally(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text('sentence\tlabel\nit \'s a "charming and often affecting journey \t1\nunflinchingly bleak\t0\n')
    raw = read_data(str(path))
    assert raw.format == "classification"
    assert raw.rows == [{"text": 'it \'s a "charming and often affecting journey ', "label": 1},
                        {"text": "unflinchingly bleak", "label": 0}]


def test_mrpc_tsv_becomes_sentence_pairs(tmp_path):
    path = tmp_path / "msr_paraphrase_train.tsv"
    path.write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                    "1\t702876\t702977\tAmrozi accused his brother .\tReferring to him , Amrozi accused his brother .\n")
    raw = read_data(str(path))
    assert raw.rows == [{"text": "Amrozi accused his brother .",
                         "text_pair": "Referring to him , Amrozi accused his brother .", "label": 1}]


def test_csv_exports_and_string_labels(tmp_path):
    qqp = tmp_path / "qqp.csv"
    qqp.write_text('question1,question2,is_duplicate\n"How, why?",Why?,0\nA?,B?,1\n')
    assert read_data(str(qqp)).rows[0] == {"text": "How, why?", "text_pair": "Why?", "label": 0}
    mnli = tmp_path / "mnli.tsv"
    mnli.write_text("index\tsentence1\tsentence2\tgold_label\n0\tA man .\tA person .\tentailment\n")
    assert read_data(str(mnli)).rows == [{"text": "A man .", "text_pair": "A person .", "label": "entailment"}]


def test_unusable_glue_files_are_named(tmp_path):
    stsb = tmp_path / "sts.tsv"
    stsb.write_text("index\tsentence1\tsentence2\tscore\n0\ta\tb\t3.8\n")
    with pytest.raises(DataError, match="regression"):
        read_data(str(stsb))
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nfine\t1\nextra\ttab\t0\n")
    with pytest.raises(DataError, match="line 3: 3 tab-separated fields"):
        read_data(str(bad))
    test_split = tmp_path / "test.tsv"
    test_split.write_text("sentence\tlabel\nno label here\t\n")
    with pytest.raises(DataError, match="empty label"):
        read_data(str(test_split))


@pytest.fixture(scope="module")
def glue_demo(tmp_path_factory):
    ex = _example()
    out = tmp_path_factory.mktemp("glue")
    ex.write_glue(out, n_train=32, n_dev=8)
    ex.make_tiny_roberta(out / "model", [s for s, _ in ex.sst2_rows(64, 0)])
    return out


def test_mrpc_pairs_train_roberta_with_lora_on_query_and_value(glue_demo, tmp_path):
    from transformers import AutoTokenizer

    from lorakit.data.encode import encode
    from lorakit.train import train

    from .train_helpers import quick_args

    tok = AutoTokenizer.from_pretrained(glue_demo / "model")
    raw = read_data(str(glue_demo / "mrpc" / "train.tsv"))
    enc = encode(raw, tok, 512, {"0": 0, "1": 1})
    row = raw.rows[0]
    ids = enc.examples[0]["input_ids"]
    assert ids == tok(row["text"], row["text_pair"])["input_ids"]
    # RoBERTa's pair layout <s> a </s></s> b </s>, with real word pieces (no <unk>)
    a = tok(row["text"], add_special_tokens=False)["input_ids"]
    b = tok(row["text_pair"], add_special_tokens=False)["input_ids"]
    assert ids == [tok.cls_token_id, *a, tok.sep_token_id, tok.sep_token_id, *b, tok.sep_token_id]
    assert tok.unk_token_id not in ids
    result = train(quick_args(glue_demo / "model", glue_demo / "mrpc" / "train.tsv", tmp_path / "run",
                              eval_data=str(glue_demo / "mrpc" / "dev.tsv"), r=8, lora_alpha=16,
                              target_modules=["query", "value"], max_steps=2))
    assert result.metrics["run"]["task"] == "seq-cls"
    keys = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    lora_modules = {k.split(".")[-3] for k in keys if ".lora_" in k}
    assert lora_modules == {"query", "value"}
    assert {k for k in keys if ".lora_" not in k} >= {"base_model.model.classifier.dense.weight",
                                                       "base_model.model.classifier.out_proj.weight"}
