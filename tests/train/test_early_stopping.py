"""Issue 17 item 2 · early stopping and the best checkpoint (``early_stopping_patience``,
``metric_for_best``, ``save_best``).

The eval metric is scripted (the loop's ``evaluate_loss`` / the generation eval replaced by a fixed
sequence), so the step where the run must stop is known in advance; the best adapter is loaded with
PEFT and compared with the checkpoint written at the best step."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import ConfigError
from lorakit.train import TrainArgs, train
from lorakit.train import loop as loop_module
from lorakit.train.early_stop import EarlyStopping
from lorakit.train.gen_eval import GenerationEval, GenScore
from lorakit.train.metrics import LossMetrics
from lorakit.train.report import summary_lines

from .train_helpers import quick_args, write_rows


def _script_loss(monkeypatch, values):
    calls = iter(values)

    def fake(*args, **kwargs):
        v = next(calls)
        return LossMetrics(v, 2.0 ** v, 0.5, 10)

    monkeypatch.setattr(loop_module, "evaluate_loss", fake)


def _peft_lora(adapter_dir, base_dir) -> dict[str, torch.Tensor]:
    """The adapter as PEFT loads it, keyed like lorakit's checkpoint (``...q_proj.lora.default.lora_A``)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir))
    out = {}
    for name, p in net.named_parameters():
        for factor in ("lora_A", "lora_B"):
            suffix = f".{factor}.default.weight"
            if name.endswith(suffix):
                key = name.removeprefix("base_model.model.").removesuffix(suffix) + f".lora.default.{factor}"
                out[key] = p.detach()
    return out


def _checkpoint(out, step) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors"))


def test_rising_eval_loss_stops_early_and_keeps_the_best(tmp_path, tiny_lm, instr_file, monkeypatch):
    # before, then steps 2, 4, 6, 8: best at 4, two evaluations without improvement → stop after step 8.
    _script_loss(monkeypatch, [5.0, 4.0, 3.0, 3.5, 3.6, 3.7])
    out = tmp_path / "run"
    result = train(quick_args(tiny_lm, instr_file, out, eval_data=str(instr_file), max_steps=20, eval_every=2,
                              early_stopping_patience=2, save_best=True, save_every=2, keep_checkpoints=10,
                              eval_generate_rows=0))
    m = result.metrics
    assert result.steps_done == 8 and m["steps"]["done"] == 8 and m["steps"]["total"] == 20
    assert m["best"]["step"] == 4 and m["best"]["value"] == 3.0 and m["best"]["stopped_early"]
    assert "early stopping at step 8: eval_loss did not improve for 2 evaluations" in m["steps"]["stopped"]
    assert json.loads((out / "best" / "lorakit_best.json").read_text()) == {"step": 4, "metric": "eval_loss",
                                                                            "value": 3.0}
    best, at4, at8 = _peft_lora(out / "best", tiny_lm), _checkpoint(out, 4), _checkpoint(out, 8)
    assert best.keys() == at4.keys()
    for k in at4:
        assert torch.equal(best[k], at4[k]), k
    assert any(not torch.equal(at4[k], at8[k]) for k in at4)  # the best is not simply the last
    lines = "\n".join(summary_lines(m))
    assert f"best         step 4: eval_loss 3.0000 (lower is better) · saved in {out / 'best'}" in lines
    assert "stopped      early stopping at step 8" in lines


def test_score_metric_is_greater_is_better(tmp_path, tiny_lm, instr_file, monkeypatch):
    scores = iter([0.1, 0.2, 0.5, 0.4, 0.45, 0.9])  # before, steps 2, 4, 6, 8 (stop), after

    def run(self, model, autocast=None):
        self.last = GenScore(self.scorer.spec, next(scores), 3, self.max_new_tokens, ())
        return self.last

    monkeypatch.setattr(GenerationEval, "run", run)
    out = tmp_path / "run"
    result = train(quick_args(tiny_lm, instr_file, out, eval_data=str(instr_file), max_steps=20, eval_every=2,
                              early_stopping_patience=2, save_best=True, metric_for_best="eval_score",
                              save_every=2, keep_checkpoints=10))
    assert result.steps_done == 8 and result.metrics["best"]["step"] == 4
    assert result.metrics["best"]["value"] == 0.5 and result.metrics["best"]["greater_is_better"]
    best, at4 = _peft_lora(out / "best", tiny_lm), _checkpoint(out, 4)
    assert all(torch.equal(best[k], at4[k]) for k in at4)


def test_best_can_be_the_final_evaluation(tmp_path, tiny_lm, instr_file, monkeypatch):
    # steps 2 and 4 evaluated in the loop, the final evaluation after step 5 is the best
    _script_loss(monkeypatch, [5.0, 4.0, 3.0, 2.5])
    out = tmp_path / "run"
    result = train(quick_args(tiny_lm, instr_file, out, eval_data=str(instr_file), max_steps=5, eval_every=2,
                              save_best=True, eval_generate_rows=0))
    assert result.steps_done == 5 and result.metrics["best"]["step"] == 5
    assert not result.metrics["best"]["stopped_early"] and "stopped" not in result.metrics["steps"]
    best, final = _peft_lora(out / "best", tiny_lm), _peft_lora(out / "adapter", tiny_lm)
    assert all(torch.equal(best[k], final[k]) for k in final)


def test_state_follows_a_naive_rule():
    history = [{"step": s, "eval_loss": v} for s, v in [(1, 3.0), (2, 2.0), (3, float("nan")), (4, 2.5), (5, 1.0)]]
    es = EarlyStopping("eval_loss", patience=3)
    es.replay(history)
    assert (es.best_step, es.best_value, es.since_best, es.stop_reason) == (5, 1.0, 0, None)
    es = EarlyStopping("eval_loss", patience=2)
    flags = [es.observe(r["step"], r["eval_loss"]) for r in history]
    assert flags == [True, True, False, False, True]  # NaN never improves
    assert es.stop_reason.startswith("early stopping at step 4") and es.best_step == 5
    up = EarlyStopping("eval_score")
    assert [up.observe(i, v) for i, v in enumerate([0.2, 0.1, 0.2, 0.3])] == [True, False, False, True]


def test_settings_are_checked_before_training(tmp_path, tiny_lm, instr_file):
    with pytest.raises(ConfigError, match="early_stopping_patience needs evaluations during training: set eval_every"):
        TrainArgs(early_stopping_patience=2)
    with pytest.raises(ConfigError, match="save_best needs evaluations"):
        TrainArgs(save_best=True)
    with pytest.raises(ConfigError, match="metric_for_best='acc'"):
        TrainArgs(metric_for_best="acc", eval_every=1)
    out = tmp_path / "a"
    with pytest.raises(ConfigError, match="save_best needs eval data"):
        train(quick_args(tiny_lm, instr_file, out, eval_every=1, save_best=True))
    assert not (out / "checkpoints").exists()
    text = write_rows(tmp_path / "text.jsonl", [{"text": "abc def"}] * 8)
    with pytest.raises(ConfigError, match="metric_for_best=eval_score needs a generation score.*no reference answers"):
        train(quick_args(tiny_lm, text, tmp_path / "b", eval_data=str(text), eval_every=1,
                         early_stopping_patience=1, metric_for_best="eval_score"))
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_a_resumed_run_stops_where_the_whole_run_did(tmp_path, tiny_lm, instr_file, monkeypatch):
    kw = dict(eval_data=str(instr_file), max_steps=20, eval_every=2, early_stopping_patience=2, save_best=True,
              save_every=2, keep_checkpoints=10, eval_generate_rows=0)
    out = tmp_path / "run"
    _script_loss(monkeypatch, [5.0, 4.0, 3.0, 3.5, 3.6, 3.7])
    whole = train(quick_args(tiny_lm, instr_file, out, **kw))
    # From step 4 the state comes from the logged history (best 3.0 at step 4); steps 6 and 8 are worse.
    _script_loss(monkeypatch, [3.5, 3.6, 3.7])
    resumed = train(quick_args(tiny_lm, instr_file, out, resume=str(out / "checkpoints" / "step-000004"), **kw))
    assert resumed.steps_done == whole.steps_done == 8
    assert resumed.metrics["best"]["step"] == 4 and resumed.metrics["best"]["value"] == 3.0
