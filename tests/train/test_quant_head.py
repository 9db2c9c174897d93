"""`lorakit train quant=…` keeps a frozen output head/embedding in bf16 (quant_head=bf16, the default);
quant_head=compute opts out; a head that trains is never converted."""

from __future__ import annotations

import math

import pytest

from lorakit.errors import CheckpointError, ConfigError
from lorakit.quant import head16
from lorakit.train import train

from .train_helpers import quick_args


def _run(tiny_lm, data, out, monkeypatch, **kw):
    notes: list[str] = []
    real = head16.keep_head_16bit

    def spy(model, *a, **k):
        note = real(model, *a, **k)
        notes.append(note)
        notes.append((type(model.get_output_embeddings()).__name__, type(model.get_input_embeddings()).__name__))
        return note

    monkeypatch.setattr("lorakit.train.loop.keep_head_16bit", spy)
    result = train(quick_args(tiny_lm, data, out, quant="nf4", bf16=False, eval_rows=0, **kw))
    assert math.isfinite(result.metrics["loss"]["last"])
    return notes


def test_frozen_head_is_kept_in_bf16_by_default(tiny_lm, instr_file, tmp_path, monkeypatch, capsys):
    notes = _run(tiny_lm, instr_file, tmp_path / "a", monkeypatch)
    assert "kept frozen in bfloat16" in notes[0]
    assert notes[1] == ("FrozenHead", "FrozenEmbedding")
    assert "16-bit head:" in capsys.readouterr().out


def test_quant_head_compute_opts_out(tiny_lm, instr_file, tmp_path, monkeypatch):
    assert _run(tiny_lm, instr_file, tmp_path / "b", monkeypatch, quant_head="compute") == []


def test_a_trained_head_is_kept(tiny_lm, instr_file, tmp_path, monkeypatch):
    notes = _run(tiny_lm, instr_file, tmp_path / "c", monkeypatch, modules_to_save=["lm_head"])
    assert notes[1][0] != "FrozenHead" and "head trains" in notes[0] or "kept" in notes[0]


def test_bad_quant_head_value_is_named(tiny_lm, instr_file, tmp_path):
    with pytest.raises(ConfigError, match="quant_head"):
        quick_args(tiny_lm, instr_file, tmp_path / "d", quant="nf4", quant_head="fp8")


@pytest.mark.parametrize("first,then", [("bf16", "compute"), ("compute", "bf16")])
def test_resume_refuses_another_quant_head(tiny_lm, instr_file, tmp_path, first, then):
    """The frozen head's dtype changes every loss, so a resume must keep it (it is in the fingerprint)."""
    out = tmp_path / first
    train(quick_args(tiny_lm, instr_file, out, quant="nf4", bf16=False, eval_rows=0, max_steps=2, save_every=1,
                     quant_head=first))
    with pytest.raises(CheckpointError, match="quant_head"):
        train(quick_args(tiny_lm, instr_file, out, quant="nf4", bf16=False, eval_rows=0, max_steps=4,
                         resume="auto", resume_override=["max_steps"], quant_head=then))
    done = train(quick_args(tiny_lm, instr_file, out, quant="nf4", bf16=False, eval_rows=0, max_steps=4,
                            resume="auto", resume_override=["max_steps"], quant_head=first))
    assert math.isfinite(done.metrics["loss"]["last"])
