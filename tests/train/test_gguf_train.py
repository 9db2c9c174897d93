"""`lorakit train --model FILE.gguf`: tokenizer and chat template from the file, the packed GGUF base
(quant=gguf) or the dequantized one, then eval/generate/merge from the saved adapter, and export."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quant"))
from gguf_helpers import write_tiny_gguf  # noqa: E402

from lorakit.cli import main  # noqa: E402
from lorakit.errors import ConfigError  # noqa: E402
from lorakit.train.model import model_dir  # noqa: E402

from .train_helpers import write_rows  # noqa: E402

ROWS = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
        for w in ("this", "that", "there", "then", "the", "those", "toast", "north")]


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(d / "tiny.gguf", qtype="Q4_1")
    return d / "tiny.gguf"


def _train(gguf_file, tmp_path, quant):
    data = write_rows(tmp_path / "chat.jsonl", ROWS)
    out = tmp_path / "run"
    code = main(["train", "--model", str(gguf_file), "--data", str(data), "--output-dir", str(out), "--no-progress",
                 f"quant={quant}", "max_steps=2", "batch_size=4", "lr=0.01", "r=4", "threads=1", "eval_rows=4",
                 "max_length=48"])
    return code, out / "adapter"


def test_train_packed_then_commands(gguf_file, tmp_path, capsys):
    code, adapter = _train(gguf_file, tmp_path, "gguf")
    assert code == 0 and (adapter / "adapter_model.safetensors").is_file()
    assert main(["generate", "--adapter", str(adapter), "--chat", "--max-new-tokens", "3", "say this"]) == 0
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    assert main(["export", str(adapter), "--format", "gguf", "--base", str(gguf_file)]) == 0
    assert (adapter / "adapter.gguf").is_file()


def test_train_dequantized(gguf_file, tmp_path):
    code, adapter = _train(gguf_file, tmp_path, "none")
    assert code == 0 and (adapter / "adapter_model.safetensors").is_file()


def test_gguf_paths_get_gguf_advice(tmp_path, capsys):
    with pytest.raises(ConfigError, match="no such GGUF file") as e:
        model_dir(str(tmp_path / "absent.gguf"))
    assert "huggingface-cli" not in str(e.value)
    (tmp_path / "m.Q4_0.gguf").write_bytes(b"")
    with pytest.raises(ConfigError, match="pass the .gguf file itself"):
        model_dir(str(tmp_path))
    assert main(["train", "--model", str(tmp_path), "--data", "builtin:rev", "--no-progress"]) == 2
    assert "huggingface-cli" not in capsys.readouterr().err


def test_quant_gguf_needs_a_gguf_model(tiny_lm, tmp_path, capsys):
    assert main(["train", "--model", str(tiny_lm), "--data", "builtin:rev", "--no-progress", "quant=gguf",
                 "--output-dir", str(tmp_path / "r"), "max_steps=1"]) == 2
    assert "quant=gguf keeps a GGUF file's quantized weights" in capsys.readouterr().err


def test_classification_refused(gguf_file, tmp_path, capsys):
    data = write_rows(tmp_path / "cls.jsonl", [{"text": "a b", "label": "x"}, {"text": "c", "label": "y"}] * 4)
    assert main(["train", "--model", str(gguf_file), "--data", str(data), "--no-progress",
                 "--output-dir", str(tmp_path / "r"), "max_steps=1"]) == 2
    assert "GGUF file holds a causal language model" in capsys.readouterr().err
