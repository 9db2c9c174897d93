"""Issue 17 item 2 · sample generations every N steps: to samples.jsonl, the text log and TensorBoard,
without touching the training RNG stream or the model's training mode."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.train import train
from lorakit.train.hooks import BaseHook

from .train_helpers import quick_args


class ModeSpy(BaseHook):
    """Records the model's training mode at every micro-batch's loss."""

    def __init__(self):
        self.modes = []

    def extra_loss(self, ctx):
        self.modes.append(ctx.model.training)
        return None


def _samples(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_sampling_changes_no_loss_and_keeps_train_mode(tmp_path, tiny_lm, instr_file, capsys):
    # Dropout draws from the RNG every step: a sampler that consumed random numbers, or left the
    # model in eval mode (dropout off), would change the losses.
    kw = dict(max_steps=6, lora_dropout=0.3, eval_data=str(instr_file), eval_max_new_tokens=2)
    plain = train(quick_args(tiny_lm, instr_file, tmp_path / "plain", **kw))
    spy = ModeSpy()
    sampled = train(quick_args(tiny_lm, instr_file, tmp_path / "sampled", sample_every=2, **kw), hooks=[spy])
    assert _losses(plain.output_dir) == _losses(sampled.output_dir)
    assert spy.modes and all(spy.modes)
    rows = _samples(tmp_path / "sampled")
    assert [r["step"] for r in rows] == [2] * 3 + [4] * 3 + [6] * 3  # 3 default prompts from the eval rows
    printed = capsys.readouterr().out
    assert "samples at step 2:" in printed and "samples at step 6:" in printed


def _losses(out) -> list[float]:
    import csv

    with open(out / "log.csv") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh)]


def test_samples_are_what_the_trained_adapter_generates(tmp_path, tiny_lm, instr_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("rev abc\n\ncopy hello\n")
    out = tmp_path / "run"
    train(quick_args(tiny_lm, instr_file, out, max_steps=3, sample_every=3, sample_prompts=str(prompts),
                     sample_max_new_tokens=5))
    rows = _samples(out)
    assert [r["prompt"] for r in rows] == ["rev abc", "copy hello"] and {r["step"] for r in rows} == {3}
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), str(out / "adapter")).eval()
    for r in rows:  # instruction rows + a chat template: the prompt is sent as a user turn
        text = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                       add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            gen = net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert r["output"] == tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)


def test_samples_reach_tensorboard(tmp_path, tiny_lm, instr_file):
    pytest.importorskip("tensorboard", reason="TensorBoard logging needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(quick_args(tiny_lm, instr_file, out, max_steps=2, sample_every=1, sample_prompts=["rev ab", "copy c"]))
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert any(t.startswith("samples") for t in tags)
    tag = next(t for t in tags if t.startswith("samples"))
    events = acc.Tensors(tag)
    assert [e.step for e in events] == [1, 2]
    text = events[-1].tensor_proto.string_val[0].decode()
    assert "rev ab" in text and "copy c" in text


def test_text_data_samples_and_bad_prompts(tmp_path, tiny_lm):
    from .train_helpers import write_rows

    data = write_rows(tmp_path / "text.jsonl", [{"text": f"the quick brown fox number {i} jumps"} for i in range(12)])
    out = tmp_path / "run"
    train(quick_args(tiny_lm, data, out, max_steps=2, sample_every=2, sample_max_new_tokens=3))
    rows = _samples(out)
    assert [r["prompt"] for r in rows] == [f"the quick brown fox number {i} jumps" for i in range(3)]
    with pytest.raises(ConfigError, match="sample_prompts='missing.txt': no such file"):
        train(quick_args(tiny_lm, data, tmp_path / "bad", sample_every=1, sample_prompts="missing.txt"))
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_resume_drops_samples_of_redone_steps(tmp_path, tiny_lm, instr_file):
    out = tmp_path / "run"
    kw = dict(sample_every=1, sample_prompts=["rev ab"], sample_max_new_tokens=2, save_every=2, keep_checkpoints=5)
    train(quick_args(tiny_lm, instr_file, out, max_steps=4, **kw))
    assert [r["step"] for r in _samples(out)] == [1, 2, 3, 4]
    train(quick_args(tiny_lm, instr_file, out, max_steps=4, resume=str(out / "checkpoints" / "step-000002"), **kw))
    assert [r["step"] for r in _samples(out)] == [1, 2, 3, 4]


@pytest.mark.parametrize("bad", [[], [""], [3], 5, "  "])
def test_sample_prompts_are_checked_on_construction(bad):
    from lorakit.train import TrainArgs

    with pytest.raises(ConfigError, match="sample_prompts="):
        TrainArgs(sample_prompts=bad)
