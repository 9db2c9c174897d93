"""Built-in tasks: registry, determinism, split disjointness, answers, scoring, JSONL, tokenizer."""

from __future__ import annotations

import json
import string

import pytest
from transformers import AutoTokenizer

from lorakit import tasks
from lorakit.errors import ConfigError, DataError
from lorakit.tasks import format_answer, format_prompt, to_messages

# Independent re-statements of every task's answer, to check the generators against.
REFERENCE = {
    "copy": lambda s: s,
    "rev": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "add": lambda s: str(int(s.split()[0]) + int(s.split()[1])),
    "shift": lambda s: s.translate(str.maketrans(string.ascii_lowercase, "bcdefghijklmnopqrstuvwxyza")),
    "count": lambda s: str(s.split()[1].count(s.split()[0])),
    "max": lambda s: str(max(int(c) for c in s)),
    "sub": lambda s: str(int(s.split()[0]) - int(s.split()[1])),
    "dedup": lambda s: "".join(c for i, c in enumerate(s) if c not in s[:i]),
    "swap": lambda s: "".join(s[i + 1] + s[i] for i in range(0, len(s), 2)),
    "rotl": lambda s: s[1:] + s[0],
}


def test_registry_has_base_and_new_tasks():
    assert set(REFERENCE) == set(tasks.names())
    assert len(tasks.names("base")) >= 4 and len(tasks.names("new")) >= 5
    assert set(tasks.names("base")).isdisjoint(tasks.names("new"))
    assert tasks.DEFAULT_TASK in tasks.names("new")
    assert all(tasks.get(n).base for n in tasks.names("base"))
    assert tasks.get(tasks.get("rev")) is tasks.get("rev")


def test_unknown_task_lists_known_names():
    with pytest.raises(ConfigError, match=r"did you mean 'shift'.*known tasks: copy, rev"):
        tasks.get("shfit")
    with pytest.raises(ConfigError, match="unknown kind|must be 'all'"):
        tasks.names("old")


@pytest.mark.parametrize("name", list(REFERENCE))
def test_rows_are_right_deterministic_and_split_disjoint(name):
    task = tasks.get(name)
    train = task.examples(400, seed=7, split="train")
    evals = task.examples(400, seed=7, split="eval")
    assert train == task.examples(400, seed=7, split="train")  # same seed, same rows
    assert train != task.examples(400, seed=8, split="train")
    assert len(train) == len(evals) == 400
    assert {r["input"] for r in train}.isdisjoint({r["input"] for r in evals})
    assert all(tasks.split_of(r["input"]) == "eval" for r in evals)
    for row in train + evals:
        assert set(row) == {"instruction", "input", "output"}
        assert row["instruction"] == task.instruction
        assert row["output"] == REFERENCE[name](row["input"]), row
        assert len(format_prompt(row) + format_answer(row)) <= 24  # short for a 128-position model


def test_split_is_shared_across_tasks():
    # The partition hashes the input alone: an eval input of `shift` is never a train input of `copy`.
    copy_train = {r["input"] for r in tasks.get("copy").examples(3000, seed=0)}
    shift_eval = {r["input"] for r in tasks.get("shift").examples(3000, seed=0, split="eval")}
    assert copy_train.isdisjoint(shift_eval)


def test_bad_arguments_are_rejected():
    with pytest.raises(ConfigError, match="split 'test'"):
        tasks.get("copy").examples(3, split="test")
    with pytest.raises(ConfigError, match="n=-1"):
        tasks.get("copy").examples(-1)


def test_format_of_a_hand_written_row():
    row = {"instruction": "rev", "input": "abc", "output": "cba"}
    assert format_prompt(row) == "rev abc="
    assert format_answer(row) == "cba\n"
    assert format_prompt({"instruction": "hi", "input": "", "output": "x"}) == "hi="
    assert to_messages(row) == [
        {"role": "user", "content": "rev abc"},
        {"role": "assistant", "content": "cba"},
    ]
    with pytest.raises(DataError, match="no 'output' field"):
        format_answer({"instruction": "rev", "input": "abc"})
    with pytest.raises(DataError, match="'instruction' .* must be a string"):
        format_prompt({"instruction": 3, "input": "abc", "output": "x"})


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("cba", True),
        ("cba\n", True),
        ("  cba \n", True),
        ("cba\nrev xyz=zyx", True),
        ("cb", False),
        ("cbaa", False),
        ("", False),
        ("\ncba", False),
        ("c ba", False),
    ],
)
def test_score_is_exact_match_of_the_first_line(prediction, expected):
    row = {"instruction": "rev", "input": "abc", "output": "cba"}
    assert tasks.get("rev").score(prediction, row) is expected


def test_score_needs_an_output():
    with pytest.raises(DataError, match="no 'output'"):
        tasks.get("add").score("3", {"instruction": "add", "input": "1 2"})


@pytest.mark.parametrize("schema", ["instruction", "messages"])
def test_write_jsonl(tmp_path, schema):
    path = tasks.write_jsonl("sub", tmp_path / "d" / "sub.jsonl", n=25, seed=3, split="eval", schema=schema)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    rows = tasks.get("sub").examples(25, seed=3, split="eval")
    assert lines == (rows if schema == "instruction" else [{"messages": to_messages(r)} for r in rows])
    with pytest.raises(ConfigError, match="schema="):
        tasks.write_jsonl("sub", tmp_path / "x.jsonl", n=1, schema="csv")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    # Saved and reloaded through AutoTokenizer: what users of the checkpoint get.
    path = tmp_path_factory.mktemp("tok")
    tasks.build_tokenizer().save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def test_tokenizer_specials(tokenizer):
    assert len(tokenizer) == 100
    assert [
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.unk_token_id,
    ] == [0, 1, 2, 3]
    assert tokenizer("é")["input_ids"] == [1, 3]  # <s> <unk>


@pytest.mark.parametrize("name", list(REFERENCE))
def test_tokenizer_round_trips_every_task(tokenizer, name):
    for row in tasks.get(name).examples(50, seed=1, split="eval"):
        text = format_prompt(row) + format_answer(row)
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1  # one token per character
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_renders_the_instruction_format(tokenizer):
    row = tasks.get("shift").examples(1, seed=0)[0]
    text = tokenizer.apply_chat_template(to_messages(row), tokenize=False)
    assert text == "<s>" + format_prompt(row) + format_answer(row) + "</s>"
    prompt = tokenizer.apply_chat_template(to_messages(row)[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>" + format_prompt(row)
    enc = tokenizer.apply_chat_template(to_messages(row), tokenize=True, return_dict=True)
    assert enc["input_ids"] == tokenizer(format_prompt(row) + format_answer(row))["input_ids"] + [2]
    from jinja2.exceptions import TemplateError  # what a chat template's raise_exception raises

    with pytest.raises(TemplateError, match="unknown role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
