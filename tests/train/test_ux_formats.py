"""Issue 17 · data formats: ShareGPT, prompt/completion, OpenAI tool calls, column mapping, eval_split,
system_prompt. Expected texts are written out by hand from the tiny tokenizer's chat template."""

from __future__ import annotations

import pytest

from lorakit.data.encode import IGNORE, encode
from lorakit.data.files import read_data
from lorakit.data.formats import split_eval
from lorakit.errors import ConfigError, DataError
from lorakit.train import TrainArgs

from .train_helpers import quick_args, write_rows


@pytest.fixture(scope="module")
def tok(tiny_lm):
    from lorakit.train.model import load_tokenizer

    return load_tokenizer(tiny_lm)


def targets(tok, example) -> str:
    return tok.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE])


def test_sharegpt_rows_become_chat_rows(tmp_path, tok):
    rows = [{"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "ab"},
                               {"from": "gpt", "value": "ba"}, {"from": "human", "value": "cd"},
                               {"from": "gpt", "value": "dc"}]}]
    raw = read_data(str(write_rows(tmp_path / "s.jsonl", rows)))
    assert raw.format == "chat"
    assert raw.rows[0]["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "ab"},
                                       {"role": "assistant", "content": "ba"}, {"role": "user", "content": "cd"},
                                       {"role": "assistant", "content": "dc"}]
    ex = encode(raw, tok, 64).examples[0]
    assert tok.decode(ex["input_ids"]) == "<s>sys\nab=ba\n</s>cd=dc\n</s>"
    assert targets(tok, ex) == "ba\n</s>dc\n</s>"


def test_sharegpt_unknown_role_names_row_and_field(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
            {"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}]
    with pytest.raises(DataError, match=r"row 2: 'from' 'robot'.*conversations\[1\]\.from"):
        read_data(str(write_rows(tmp_path / "s.jsonl", rows)))


def test_prompt_completion_rows_train_on_the_completion(tmp_path, tok):
    raw = read_data(str(write_rows(tmp_path / "pc.jsonl", [{"prompt": "abc=", "completion": "cba"}])))
    assert raw.format == "completion"
    ex = encode(raw, tok, 64).examples[0]
    assert tok.decode(ex["input_ids"]) == "<s>abc=cba</s>"
    assert targets(tok, ex) == "cba</s>"
    with pytest.raises(DataError, match=r"row 1: missing field \(field 'completion'\)"):
        read_data(str(write_rows(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": None}])))


def test_conversational_prompt_completion(tmp_path, tok):
    rows = [{"prompt": [{"role": "user", "content": "ab"}], "completion": [{"role": "assistant", "content": "ba"}]}]
    raw = read_data(str(write_rows(tmp_path / "pc.jsonl", rows)))
    assert raw.format == "chat"
    assert targets(tok, encode(raw, tok, 64).examples[0]) == "ba\n</s>"


TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}{{ 'tools:' + tools|map(attribute='name')|join(',') + '\\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ m['content'] + '=' }}"
    "{% elif m['role'] == 'tool' %}{{ 'r:' + m['content'] + '=' }}"
    "{% elif m['role'] == 'assistant' %}{% generation %}"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}{{ 'call ' + c['function']['name'] + '(' + "
    "c['function']['arguments'] + ')' }}{% endfor %}{% else %}{{ m['content'] }}{% endif %}"
    "{{ '\\n' + eos_token }}{% endgeneration %}{% endif %}{% endfor %}"
)


def test_openai_tool_calls_pass_through_the_template(tmp_path, tok):
    rows = [{"tools": [{"name": "add"}],
             "messages": [{"role": "user", "content": "1+2"},
                          {"role": "assistant", "content": None, "tool_calls": [
                              {"type": "function", "function": {"name": "add", "arguments": "1,2"}}]},
                          {"role": "tool", "content": "3", "tool_call_id": "c1"},
                          {"role": "assistant", "content": "3"}]}]
    raw = read_data(str(write_rows(tmp_path / "t.jsonl", rows)))
    assert raw.format == "chat"
    tok = tok.__class__.from_pretrained(tok.name_or_path) if tok.name_or_path else tok
    tok.chat_template = TOOL_TEMPLATE
    ex = encode(raw, tok, 128).examples[0]
    assert tok.decode(ex["input_ids"]) == "<s>tools:add\n1+2=call add(1,2)\n</s>r:3=3\n</s>"
    assert targets(tok, ex) == "call add(1,2)\n</s>3\n</s>"


def test_column_mapping(tmp_path, tok):
    rows = [{"question": "abc", "answer": "cba"}, {"question": "xy", "answer": "yx"}]
    path = str(write_rows(tmp_path / "q.jsonl", rows))
    with pytest.raises(DataError, match=r"columns\.instruction=question"):  # the hint names the mapping
        read_data(path)
    raw = read_data(path, columns={"instruction": "question", "output": "answer"})
    assert raw.format == "instruction"
    assert raw.rows == [{"instruction": "abc", "output": "cba"}, {"instruction": "xy", "output": "yx"}]
    with pytest.raises(DataError, match=r"columns\.output='answr' names no column.*'answer'"):
        read_data(path, columns={"instruction": "question", "output": "answr"})


def test_column_mapping_from_the_command_line_syntax(tmp_path):
    from lorakit.cli.options import build

    args = build(TrainArgs, ("key=value arguments", {"columns.instruction": "question", "columns.output": "answer"}))
    assert args.columns == {"instruction": "question", "output": "answer"}


def test_split_eval_is_seeded_and_disjoint():
    rows = list(range(100))
    tr, ev = split_eval(rows, 0.05, 3, "x")
    assert len(ev) == 5 and len(tr) == 95 and sorted(tr + ev) == rows
    assert split_eval(rows, 0.05, 3, "x") == (tr, ev)
    assert split_eval(rows, 0.05, 4, "x")[1] != ev
    with pytest.raises(DataError, match="eval_split"):
        split_eval([1], 0.5, 0, "x")


def test_eval_split_in_a_run(tmp_path, tiny_lm, instr_file):
    from lorakit.train import train

    n = sum(1 for _ in open(instr_file))
    res = train(quick_args(tiny_lm, instr_file, tmp_path / "run", eval_split=0.25, max_steps=2))
    data = res.metrics["data"]
    assert data["eval"]["rows"] == round(n * 0.25) and data["train"]["rows"] == n - round(n * 0.25)
    assert res.metrics["eval"]["after"]["loss"] > 0
    with pytest.raises(ConfigError, match="eval_split and eval_data"):
        quick_args(tiny_lm, instr_file, tmp_path / "r2", eval_split=0.1, eval_data=str(instr_file))
    with pytest.raises(ConfigError, match="eval_split=1.5"):
        quick_args(tiny_lm, instr_file, tmp_path / "r2", eval_split=1.5)


@pytest.mark.parametrize("system,expected", [
    (None, "<s>ab=ba\n</s>"),            # the template's own behaviour (this one has no default)
    ("", "<s>\nab=ba\n</s>"),            # an empty system turn
    ("be brief", "<s>be brief\nab=ba\n</s>"),
])
def test_system_prompt(tmp_path, tok, system, expected):
    raw = read_data(str(write_rows(tmp_path / "i.jsonl", [{"instruction": "ab", "output": "ba"}])))
    ex = encode(raw, tok, 64, system_prompt=system).examples[0]
    assert tok.decode(ex["input_ids"]) == expected
    assert targets(tok, ex) == "ba\n</s>"
    # a row with its own system turn keeps it
    chat = {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "ab"},
                         {"role": "assistant", "content": "ba"}]}
    raw = read_data(str(write_rows(tmp_path / "c.jsonl", [chat])))
    assert tok.decode(encode(raw, tok, 64, system_prompt=system).examples[0]["input_ids"]) == "<s>own\nab=ba\n</s>"


def test_system_prompt_word_and_validation(tmp_path, tiny_lm, instr_file):
    from lorakit.cli.options import build

    assert build(TrainArgs, ("x", {"system_prompt": ""})).system_prompt == ""
    assert TrainArgs().system_prompt == "auto"
    with pytest.raises(ConfigError, match="system_prompt"):
        TrainArgs(system_prompt=3)


def test_resume_refuses_another_eval_split(tmp_path, tiny_lm, instr_file):
    from lorakit.errors import CheckpointError
    from lorakit.train import train

    out = tmp_path / "run"
    train(quick_args(tiny_lm, instr_file, out, max_steps=2, save_every=1, eval_split=0.25))
    with pytest.raises(CheckpointError, match="eval_split"):
        train(quick_args(tiny_lm, instr_file, out, max_steps=2, resume="auto", eval_split=0.5))
