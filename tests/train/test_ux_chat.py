"""Issue 17 · chat made explicit: generate's --system / --file / --interactive and the empty-output
note, merge --dtype."""

from __future__ import annotations

import io
import json

import pytest
import torch

from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.train.generation import Generator

from .train_helpers import quick_args


@pytest.fixture(scope="module")
def adapter(tiny_lm, tmp_path_factory):
    from lorakit.train import train

    out = tmp_path_factory.mktemp("chat") / "run"
    train(quick_args(tiny_lm, "builtin:rev", out, max_steps=1))
    return out / "adapter"


def test_system_implies_chat_and_is_rendered_first(tiny_lm):
    from lorakit.train.inference import load_for_inference

    net, tok, _ = load_for_inference(str(tiny_lm), None)
    gen = Generator(net, tok, system="be brief")
    assert gen.chat
    assert tok.decode(gen.inputs("ab")["input_ids"][0]) == "<s>be brief\nab="  # the template, by hand
    assert tok.decode(Generator(net, tok).inputs("ab=")["input_ids"][0]) == "<s>ab="
    assert gen.hint("") is None  # chat was asked for
    assert "--chat" in Generator(net, tok).hint("  ")
    assert Generator(net, tok).hint("x") is None


def test_system_needs_a_template(tiny_lm_no_template, capsys):
    assert main(["generate", "--model", str(tiny_lm_no_template), "--system", "hi", "ab="]) == 2
    assert "--system needs a tokenizer with a chat template" in capsys.readouterr().err


def test_empty_output_on_a_chat_model_is_explained(adapter, monkeypatch, capsys):
    monkeypatch.setattr(Generator, "__call__", lambda self, prompt: "")
    assert main(["generate", "--adapter", str(adapter), "ab="]) == 0
    cap = capsys.readouterr()
    assert cap.out == "\n" and "note:" in cap.err and "--chat" in cap.err


def test_file_gives_one_json_line_per_prompt(adapter, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("rev abc=\n\nrev xy=\n")
    assert main(["generate", "--adapter", str(adapter), "--file", str(prompts), "--max-new-tokens", "4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["rev abc=", "rev xy="]
    for r in rows:  # the same text as a one-prompt call
        assert main(["generate", "--adapter", str(adapter), r["prompt"], "--max-new-tokens", "4"]) == 0
        assert capsys.readouterr().out.rstrip("\n") == r["output"].rstrip("\n")


def test_interactive_reads_until_an_empty_line(adapter, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("rev abc=\nrev xy=\n\nrev never=\n"))
    seen = []
    real = Generator.__call__
    monkeypatch.setattr(Generator, "__call__", lambda self, p: seen.append(p) or real(self, p))
    assert main(["generate", "--adapter", str(adapter), "--interactive", "--max-new-tokens", "2"]) == 0
    assert seen == ["rev abc=", "rev xy="]


def test_generate_needs_exactly_one_source(adapter, capsys):
    assert main(["generate", "--adapter", str(adapter)]) == 2
    assert "one of: a PROMPT, --file FILE" in capsys.readouterr().err
    assert main(["generate", "--adapter", str(adapter), "--file", "/nonexistent.txt"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_merge_dtype(adapter, tmp_path, dtype, torch_dtype):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "f32")]) == 0
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / dtype), "--dtype", dtype]) == 0
    ref, low = load_file(tmp_path / "f32" / "model.safetensors"), load_file(tmp_path / dtype / "model.safetensors")
    assert set(ref) == set(low)
    for k, v in ref.items():  # the fp32 merge, rounded once
        assert low[k].dtype == torch_dtype and torch.equal(low[k], v.to(torch_dtype)), k
    assert AutoModelForCausalLM.from_pretrained(tmp_path / dtype).dtype == torch_dtype


def test_merge_dtype_is_checked(adapter, tmp_path):
    from lorakit.cli.commands import merge

    with pytest.raises(ConfigError, match="--dtype 'int4'"):
        merge(str(adapter), str(tmp_path / "x"), dtype="int4")
    assert not (tmp_path / "x").exists()
