"""`lorakit eval | merge | generate | info` on an adapter trained by `lorakit train`."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.cli import main

#: the one example the adapter memorises: the random-init tiny base cannot answer it, the adapter must.
ROW = {"instruction": "rev", "input": "djfetfq", "output": "qftefjd"}
PROMPT, ANSWER = "rev djfetfq=", "qftefjd"


@pytest.fixture(scope="module")
def trained(tiny_lm, tmp_path_factory):
    from .train_helpers import write_rows

    tmp = tmp_path_factory.mktemp("cmd")
    data = write_rows(tmp / "one.jsonl", [ROW] * 16)
    out = tmp / "run"
    code = main(["train", "--model", str(tiny_lm), "--data", str(data), "--output-dir", str(out), "--no-progress",
                 "max_steps=60", "batch_size=4", "lr=0.01", "r=4", "eval_rows=8", "threads=1"])
    assert code == 0
    return tiny_lm, out / "adapter", data


def test_info(trained, capsys):
    _, adapter, _ = trained
    assert main(["info", str(adapter)]) == 0
    text = capsys.readouterr().out
    assert "r / alpha    4 / 16.0" in text and "r=4 × 14 modules" in text and "tensors      28" in text
    assert main(["info", str(adapter), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tensors"] == 28 and data["peft_type"] == "LORA" and len(data["ranks"]) == 14


def test_eval_compares_base_and_adapter(trained, capsys):
    tiny_lm, adapter, data = trained
    assert main(["eval", "--adapter", str(adapter), "--data", str(data), "--eval-rows", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"data", "base", "adapter"}
    # the memorised answer: the adapter predicts every answer token, the base does not. (The loss stays
    # near ln(vocab): lm_head is frozen at its tiny random init behind an RMSNorm, so logits stay flat.)
    assert result["adapter"]["loss"]["accuracy"] == 1.0 and result["base"]["loss"]["accuracy"] < 0.5
    assert result["adapter"]["loss"]["loss"] < result["base"]["loss"]["loss"]
    assert main(["eval", "--adapter", str(adapter), "--data", "builtin:rev", "--eval-rows", "8", "--json"]) == 0
    builtin = json.loads(capsys.readouterr().out)
    assert 0.0 <= builtin["adapter"]["exact_match"] <= 1.0  # the task's other rows were never seen
    assert main(["eval", "--model", str(tiny_lm), "--data", "builtin:rev", "--eval-rows", "4"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_merge_saves_a_checkpoint_from_pretrained_loads(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit.train.inference import load_for_inference

    tiny_lm, adapter, _ = trained
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    adapted, tok, _ = load_for_inference(str(tiny_lm), str(adapter))
    ids = tok(["rev abc="], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_generate(trained, capsys):
    tiny_lm, adapter, _ = trained
    assert main(["generate", "--adapter", str(adapter), PROMPT, "--max-new-tokens", str(len(ANSWER))]) == 0
    assert capsys.readouterr().out == ANSWER + "\n"  # the learned answer, character by character
    assert main(["generate", "--model", str(tiny_lm), PROMPT, "--max-new-tokens", str(len(ANSWER))]) == 0
    assert not capsys.readouterr().out.startswith(ANSWER)  # the base model does not know it


def test_commands_report_bad_paths(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--data", "builtin:rev"]) == 2
    assert "not a local transformers model directory" in capsys.readouterr().err
