"""replay_data=self (Magpie prompts + the base model's own answers) and the forgetting probe."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.data.batches import collate
from lorakit.errors import ConfigError
from lorakit.tasks import build_tokenizer
from lorakit.train import train
from lorakit.train.probe import ForgettingProbe
from lorakit.variants.self_replay import chat_frame, magpie_prompts, self_replay_rows

from .train_helpers import quick_args, tiny_llama_config, write_rows


def _chat_rows(n=24):
    return [{"messages": [{"role": "user", "content": f"capital of land{i}?"},
                          {"role": "assistant", "content": f"city{i}"}]} for i in range(n)]


def test_chat_frame_is_the_text_around_a_user_turn():
    tok = build_tokenizer()
    frame = chat_frame(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "hello there"}], tokenize=False)
    assert text.startswith(frame.user_prefix + "hello there")
    assert frame.end_of_turn and frame.end_of_turn in text[len(frame.user_prefix) + len("hello there"):]


class _Recorder(torch.nn.Module):
    """Stands in for a model: records what generate() was given, answers with a fixed query."""

    def __init__(self, tok, reply):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.reply, self.inputs = tok, reply, []

    def generate(self, input_ids, attention_mask=None, **kw):
        self.inputs.append(self.tok.batch_decode(input_ids, skip_special_tokens=False))
        reply = self.tok(self.reply, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return torch.cat([input_ids, reply.expand(input_ids.shape[0], -1)], 1)


def test_magpie_feeds_only_the_user_turn_prefix_and_cuts_at_the_end_of_turn():
    tok = build_tokenizer()
    frame = chat_frame(tok)
    fake = _Recorder(tok, "what is a prime number?" + frame.end_of_turn + "junk after the turn")
    prompts = magpie_prompts(fake, tok, 1)
    assert prompts == ["what is a prime number?"]
    fed = [t.replace(tok.pad_token or "\0", "") for t in fake.inputs[0]]
    assert fed == [frame.user_prefix]  # no user content: the model writes the query itself


@pytest.mark.parametrize("n", [0, -3])
def test_a_budget_of_no_prompts_is_refused(n):
    with pytest.raises(ConfigError, match="budget"):
        magpie_prompts(None, build_tokenizer(), n)


def test_a_model_without_chat_template_is_refused(tiny_lm_no_template):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_no_template)
    with pytest.raises(ConfigError, match="chat template"):
        self_replay_rows(AutoModelForCausalLM.from_pretrained(tiny_lm_no_template), tok, 4, "chat")


def test_text_rows_cannot_take_self_replay(tiny_lm):
    with pytest.raises(ConfigError, match="chat or instruction"):
        self_replay_rows(None, build_tokenizer(), 4, "text")


def test_probe_kl_and_agreement_match_a_hand_computation_against_a_copy_of_the_base():
    tok = build_tokenizer()
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(tok)).eval()
    reference = copy.deepcopy(base)
    model = lorakit.inject(base, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    init_lora_weights=False))
    ids = torch.randint(3, 40, (3, 10)).tolist()
    examples = [{"input_ids": r, "labels": [-100] * 4 + r[4:]} for r in ids]
    probe = ForgettingProbe(examples, tok.pad_token_id, every=1)
    got = probe.measure(model)
    b = collate(examples, tok.pad_token_id)
    labels = b.pop("labels")[:, 1:]
    keep = labels != -100
    with torch.no_grad():
        p = F.log_softmax(reference(**b).logits[:, :-1], -1)[keep]
        q = F.log_softmax(model(**b).logits[:, :-1], -1)[keep]
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert got["probe_kl"] == pytest.approx(kl, rel=1e-4) and kl > 0
    assert got["probe_agree"] == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).float().mean()))
    with lorakit.disabled(model):
        assert probe.measure(model) == {"probe_kl": pytest.approx(0.0, abs=1e-6), "probe_agree": 1.0}


def test_self_replay_run_mixes_self_written_rows_and_logs_the_probe(tiny_lm, tmp_path):
    data = write_rows(tmp_path / "chat.jsonl", _chat_rows())
    res = train(quick_args(tiny_lm, data, tmp_path / "run", replay=0.25, replay_data="self",
                           self_replay_prompts=6, probe_every=2, probe_rows=2, max_steps=4))
    metrics = json.loads((res.output_dir / "metrics.json").read_text())
    train_counts = metrics["data"]["train"]
    assert train_counts["rows"] == 24 + 8  # 25 % of the mix: 8 replayed rows beside 24
    assert "self-written" in train_counts["source"]
    rows = list(csv.DictReader((res.output_dir / "log.csv").open()))
    kls = [float(r["probe_kl"]) for r in rows if r.get("probe_kl")]
    assert len(kls) == 2 and all(k >= 0 for k in kls)


def test_probe_stop_ends_the_run_cleanly_with_an_adapter(tiny_lm, tmp_path):
    data = write_rows(tmp_path / "chat.jsonl", _chat_rows())
    res = train(quick_args(tiny_lm, data, tmp_path / "run", probe_every=1, probe_rows=2, self_replay_prompts=3,
                           probe_max_kl=1e-12, probe_action="stop", max_steps=6, lr=5e-2))
    metrics = json.loads((res.output_dir / "metrics.json").read_text())
    assert metrics["steps"]["done"] == 1 and "probe_max_kl" in metrics["steps"]["stopped"]
    assert (res.output_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_self_replay_settings_are_validated(tiny_lm, tmp_path):
    with pytest.raises(ConfigError, match="self_replay_prompts"):
        quick_args(tiny_lm, "x.jsonl", tmp_path / "r", replay=0.2, replay_data="self", self_replay_prompts=0)
    with pytest.raises(ConfigError, match="probe_action"):
        quick_args(tiny_lm, "x.jsonl", tmp_path / "r", probe_action="explode")
