"""Self-distillation: keep / replace / reject decisions with a stub generator, templates, files,
schema errors, and a real (tiny, random) model end to end."""

from __future__ import annotations

import json

import pytest

from lorakit import tasks
from lorakit.errors import ConfigError, DataError
from lorakit.variants.sdft import (
    DistillTemplate,
    builtin_check,
    counts_path,
    decide,
    distill_file,
    distill_rows,
    mentions_reference,
    read_rows,
)

ROWS = [
    {"instruction": "rev", "input": "abc", "output": "cba"},  # rewrite correct -> replaced
    {"instruction": "rev", "input": "xyz", "output": "zyx"},  # rewrite wrong -> kept
    {"instruction": "rev", "input": "pqr", "output": "rqp"},  # rewrite mentions the reference -> kept
    {"instruction": "rev", "input": "mno", "output": "onm"},  # empty rewrite -> kept
]
STUB = {"rev abc=cba\nrev abc=": "cba\nrev", "rev xyz=zyx\nrev xyz=": "zzz\n",
        "rev pqr=rqp\nrev pqr=": "the reference answer is rqp\n", "rev mno=onm\nrev mno=": "\n"}


def stub(prompts):
    return [STUB[p] for p in prompts]


def test_keep_replace_reject():
    out, counts = distill_rows(ROWS, stub, "embedded", batch_size=3)
    assert [r["output"] for r in out] == ["cba", "zyx", "rqp", "onm"]
    assert (counts.rows, counts.replaced, counts.kept) == (4, 1, 3)
    assert (counts.failed_check, counts.rejected_reference, counts.empty) == (1, 1, 1)
    assert ROWS[0]["output"] == "cba" and out[0] is not ROWS[0]  # inputs untouched
    assert "1 replaced" in str(counts)


def test_rewrite_replaces_the_response_when_the_check_accepts_it():
    rows = [{"instruction": "say", "input": "", "output": "Hello there."}]
    template = DistillTemplate("t", "{user} (ref: {reference}) ->", answer="full")
    seen = []

    def gen(prompts):
        seen.extend(prompts)
        return ["  Hi!  "]

    out, counts = distill_rows(rows, gen, template, check=lambda text, row: text.startswith("Hi"))
    assert seen == ["say (ref: Hello there.) ->"]
    assert out[0]["output"] == "Hi!" and counts.replaced == 1
    out, counts = distill_rows(rows, gen, template, check=lambda text, row: False)
    assert out[0]["output"] == "Hello there." and counts.failed_check == 1


@pytest.mark.parametrize("text", ["Based on the Reference Answer, 4", "Your response: 4", "Now it's your turn: 4",
                                  "Your turn. 4"])
def test_mentions_of_the_template_are_rejected(text):
    assert mentions_reference(text)
    assert decide(text, {"instruction": "x", "output": "4"}, lambda t, r: True) == "rejected_reference"


def test_builtin_check_uses_the_task_score():
    row = {"instruction": "add", "input": "12 30", "output": "42"}
    assert builtin_check("42", row) and not builtin_check("41", row)
    assert builtin_check("anything", {"instruction": "poem", "output": "x"})  # unknown task: accept
    assert not builtin_check("  ", {"instruction": "poem", "output": "x"})


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="unknown distillation template"):
        distill_rows(ROWS, stub, "nope")
    with pytest.raises(ConfigError, match="one continuation per prompt"):
        distill_rows(ROWS, lambda p: [], "embedded")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "rev abc", "completion": "cba"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: field\(s\) instruction, output"):
        read_rows(bad)
    bad.write_text("not json\n")
    with pytest.raises(DataError, match="bad.jsonl:1: not valid JSON"):
        read_rows(bad)
    bad.write_text('{"messages": [{"role": "system", "content": "x"}]}\n')
    with pytest.raises(DataError, match="single-turn chats"):
        read_rows(bad)
    with pytest.raises(DataError, match="no such file"):
        read_rows(tmp_path / "missing.jsonl")


def test_messages_rows_round_trip(tmp_path):
    path = tasks.write_jsonl("rev", tmp_path / "m.jsonl", 3, schema="messages")
    rows, schema = read_rows(path)
    assert schema == "messages"
    assert rows == tasks.get("rev").examples(3)


def test_distill_file_with_a_tiny_model(tmp_path):
    from conftest import tiny_llama

    tok = tasks.build_tokenizer()
    model = tiny_llama(vocab=len(tok))
    data = tasks.write_jsonl("rev", tmp_path / "rev.jsonl", 6)
    counts = distill_file(model, tok, data, tmp_path / "out.jsonl", max_new_tokens=6)
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(written) == 6 and counts.rows == 6 and counts.replaced + counts.kept == 6
    stats = json.loads(counts_path(tmp_path / "out.jsonl").read_text())
    assert stats["replaced"] == counts.replaced and stats["template"] == "embedded"
    # a random model is never right: every original response survives
    assert written == tasks.get("rev").examples(6) and counts.replaced == 0
