"""Issue 17 · feedback while training: the loss from the first step, plain lines off a terminal, s/step
without evaluation, the warm-up warning, each --help default once, the task loss logged apart from a
hook's extra term."""

from __future__ import annotations

import io
import time

import pytest
import torch

from lorakit.train import train
from lorakit.train.progress import Progress, line, warmup_warning

from .train_helpers import quick_args


def test_plain_lines_when_not_a_tty_from_the_first_step():
    out = io.StringIO()  # not a TTY
    p = Progress(total=25, initial=0, enabled=True, log_every=10, stream=out)
    for s in range(1, 26):
        p.update(s, loss=1.0 / s, lr=1e-3, seconds=0.5)
    p.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [ln.split()[1] for ln in lines] == ["1/25", "10/25", "20/25", "25/25"]
    assert "loss 1.0000" in lines[0] and "0.50 s/step" in lines[0] and "eta 0m 12s" in lines[0]
    assert lines[-1] == line(25, 25, 1 / 25, 1e-3, 0.5)


def test_resumed_progress_counts_from_the_resume_step():
    out = io.StringIO()
    p = Progress(total=10, initial=4, enabled=True, log_every=100, stream=out)
    p.update(5, 0.5, 1e-3, 2.0)
    assert out.getvalue().startswith("step 5/10") and "2.00 s/step" in out.getvalue()


def test_disabled_progress_prints_nothing():
    out = io.StringIO()
    p = Progress(total=3, initial=0, enabled=False, log_every=1, stream=out)
    p.update(1, 0.5, 1e-3, 0.1)
    assert out.getvalue() == ""


def test_warmup_warning():
    assert warmup_warning(0, 6) is None and warmup_warning(5, 6) is None
    msg = warmup_warning(50, 6)
    assert "warmup_steps=50" in msg and "6 steps" in msg and "12%" in msg  # 6/50 of the peak lr


def test_run_shows_loss_at_step_one_and_warns_about_warmup(tmp_path, tiny_lm, instr_file, capsys):
    train(quick_args(tiny_lm, instr_file, tmp_path / "r", max_steps=3, warmup_steps=5, progress=True, log_every=10))
    cap = capsys.readouterr()
    assert "warmup_steps=5 ≥ the run's 3 steps" in cap.out
    assert "\r" not in cap.err
    assert "step 1/3" in cap.err and "loss " in cap.err.split("step 1/3")[1].splitlines()[0]


def test_step_seconds_exclude_evaluation(tmp_path, tiny_lm, instr_file, monkeypatch):
    import lorakit.train.loop as metrics_mod  # the loop's own reference to evaluate_loss

    real = metrics_mod.evaluate_loss

    def slow(*a, **k):
        time.sleep(1.0)
        return real(*a, **k)

    monkeypatch.setattr(metrics_mod, "evaluate_loss", slow)
    res = train(quick_args(tiny_lm, instr_file, tmp_path / "r", max_steps=3, eval_every=1,
                           eval_data=str(instr_file)))
    t = res.metrics["time"]
    steps = sum(r["seconds"] for r in _history(tmp_path / "r"))
    assert t["eval_seconds"] >= 3.0 + 2.0  # 3 in-loop evaluations + before/after
    assert t["train_seconds"] < steps + 0.9  # without the in-loop evaluations' 3 s


def _history(out):
    import csv

    with open(out / "log.csv") as fh:
        return [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(fh)]


class ConstantExtra:
    """A hook adding a constant 100 to the optimised loss (its gradient is zero)."""

    def on_train_start(self, ctx): ...
    def after_backward(self, ctx): ...
    def after_step(self, ctx): ...
    def on_train_end(self, ctx): ...
    def state_dict(self): return {}
    def load_state_dict(self, state): ...

    def extra_loss(self, ctx):
        p = next(p for p in ctx.model.parameters() if p.requires_grad)
        return 0.0 * p.sum() + torch.tensor(100.0)


def test_logged_loss_is_the_task_loss_and_the_extra_term_is_its_own_column(tmp_path, tiny_lm, instr_file):
    # Step 1 sees the same weights and rows in both runs, so its task loss is the plain run's loss.
    train(quick_args(tiny_lm, instr_file, tmp_path / "a", max_steps=1))
    train(quick_args(tiny_lm, instr_file, tmp_path / "b", max_steps=1), hooks=[ConstantExtra()])
    ha, hb = _history(tmp_path / "a"), _history(tmp_path / "b")
    assert hb[0]["loss"] == pytest.approx(ha[0]["loss"], rel=1e-6)
    assert hb[0]["extra_loss"] == pytest.approx(100.0) and "extra_loss" not in ha[0]


def test_help_prints_each_default_once():
    from lorakit.cli import build_parser

    parser = build_parser()
    for action in parser.train_parser._actions:
        if action.help:
            assert action.help.lower().count("(default") <= 1, action.help
